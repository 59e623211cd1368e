"""Console-script entry points (each module has a ``main(argv=None) -> int``)."""
