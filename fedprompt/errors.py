"""User-facing errors.

A :class:`FedPromptError` is raised for bad input (a missing folder, an unknown method, a pretrained tag that cannot
be downloaded, ...). The CLI prints its message on one line and exits with status 2, without a traceback; the message
always names the file, key or value at fault and says what to do.
"""


class FedPromptError(Exception):
    """An error in the user's input or environment, with a message that says what to do."""


class ClientFailure(FedPromptError):
    """A client failed during local training or evaluation (including a non-finite loss)."""

    def __init__(self, client_id: int, round_idx: int, reason: str):
        self.client_id = client_id
        self.round_idx = round_idx
        self.reason = reason
        super().__init__(f"client {client_id} failed in round {round_idx}: {reason}")


def one_line(err: BaseException) -> str:
    """The message of a :class:`FedPromptError` as the one line the CLI prints. An error raised in a DataLoader worker
    process reaches the main process with the worker's traceback in its message ("Caught FedPromptError in DataLoader
    worker process 0. Original Traceback ..."): its own message is the last line."""
    text = str(err)
    marker = "FedPromptError: "
    if "Original Traceback" in text and marker in text:
        text = text.rsplit(marker, 1)[1]
    return " ".join(text.split())


def warn(message: str) -> None:
    """Print one ``fedprompt: warning: ...`` line on stderr (something was changed or left out on the user's
    explicit request, e.g. ``data.on_bad_image: skip``)."""
    import sys

    print(f"fedprompt: warning: {message}", file=sys.stderr, flush=True)
