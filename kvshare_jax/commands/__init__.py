"""One module per ``kvshare`` command, each exposing ``run(argv) -> int``."""
