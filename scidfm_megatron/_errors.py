"""Error types the command-line tools report as one line (no traceback)."""


def conversion_errors() -> tuple:
    from .convert.hf_io import HFCheckpointError
    from .convert.mcore_io import McoreCheckpointError

    return (HFCheckpointError, McoreCheckpointError)
