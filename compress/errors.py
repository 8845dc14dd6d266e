"""The exceptions the command line maps to exit codes: :class:`UsageError` for everything the
user can fix (bad flags, bad data, bad files: one line on stderr, exit 2), :class:`ParityError`
for an export that fails its check (one line, exit 1); anything else is a bug (exit 1).
Torch-free, so the CLI can name them before any command runs."""


class UsageError(Exception):
    """Bad usage or bad input: the message is shown to the user as is."""


class ParityError(RuntimeError):
    """ONNX Runtime disagrees with PyTorch beyond the tolerance: the export is wrong."""
