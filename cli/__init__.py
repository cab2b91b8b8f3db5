"""The ``onlinemf`` command line (installed as ``onlinemf.cli``)."""

import click


@click.group()
@click.version_option(package_name="onlinemf")
def main():
    """Streaming online integrative NMF for single-cell data."""


if __name__ == "__main__":
    main()
