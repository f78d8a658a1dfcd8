"""Process set-up shared by training ranks and GPU scripts (import-light)."""
from __future__ import annotations


def quiet_framework_logs() -> None:
    """Drop per-step noise that buries the progress lines; real warnings still show."""
    import logging
    import warnings

    # every ZeRO step on torch >= 2.13 warns that DeepSpeed's collectives use deprecated names
    warnings.filterwarnings("ignore", message=r".*(reduce_scatter_tensor|all_gather_into_tensor).*deprecated",
                            category=FutureWarning)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
