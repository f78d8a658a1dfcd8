"""Process set-up shared by training ranks and GPU scripts (import-light)."""
from __future__ import annotations


def quiet_framework_logs(all_ranks: bool = True) -> None:
    """Drop per-step noise that buries the progress lines; real warnings still show.

    Ranks other than 0 keep only errors unless ``all_ranks`` (``--log-all-ranks``): one rank's log is
    the run's log, as with torchrun's usual set-ups.
    """
    import logging
    import os
    import warnings

    # every ZeRO step on torch >= 2.13 warns that DeepSpeed's collectives use deprecated names
    warnings.filterwarnings("ignore", message=r".*(reduce_scatter_tensor|all_gather_into_tensor).*deprecated",
                            category=FutureWarning)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if not all_ranks and os.environ.get("RANK", "0") != "0":
        logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
        logging.getLogger("transformers").setLevel(logging.ERROR)
        warnings.simplefilter("ignore")
