from onlinemf.cli import main

main(prog_name="onlinemf")
