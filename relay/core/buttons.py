"""What a button does: a Midjourney `customId` mapped to the kind of task it makes. Pure, no I/O.

    MJ::JOB::upsample::N::<hash>                 upscale (U1-U4)
    MJ::JOB::upsample_v*::1::<hash>::SOLO        upscale (Upscale Subtle / Creative / 2x / 4x)
    MJ::JOB::variation::N::<hash>                variation (V1-V4)
    MJ::JOB::low_variation|high_variation::...   variation (Vary Subtle / Strong)
    MJ::JOB::reroll::0::<hash>::SOLO             reroll
    MJ::Outpaint::50|75::1::<hash>::SOLO         zoom (Zoom Out 2x / 1.5x)
    MJ::CustomZoom::<hash>                       zoom (Custom Zoom: waits in MODAL for a prompt)
    MJ::JOB::pan_left|right|up|down::...         pan
    MJ::Inpaint::1::<hash>::SOLO                 vary_region (waits in MODAL for a mask)
    MJ::Job::PicReader::N                        imagine (the Nth prompt of a describe)
    MJ::Job::PromptAnalyzer::N                   imagine (the Nth prompt of a shorten)
    MJ::Picread::Retry                           describe (describe the same image again)

The open-source midjourney-proxy's `submit/change` (UPSCALE / VARIATION with an index, REROLL) and
`submit/simple-change` ("<task id> U2") name no button: `change_button` finds the one of the task's buttons they mean.

Anything else (video buttons, bookmarks, a describe's "Imagine all" `MJ::Job::PicReader::all`, which makes four
grids under ids joined by commas, unknown ids) is not a task the relay runs.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from relay.domain import TaskKind

MAX_CUSTOM_ID = 200

Change = Literal["UPSCALE", "VARIATION", "REROLL"]
_CHANGE_NAMES: dict[Change, str] = {"UPSCALE": "upsample", "VARIATION": "variation", "REROLL": "reroll"}


def kind_of(custom_id: str) -> TaskKind | None:
    """The kind of task a button makes, or None for a button the relay does not run."""
    parts = custom_id.split("::")
    if len(custom_id) > MAX_CUSTOM_ID or len(parts) < 3 or parts[0] != "MJ":
        return None
    family, name = parts[1].upper(), parts[2].lower()
    if family == "JOB":
        if name == "upsample" or name.startswith("upsample_v"):
            return TaskKind.UPSCALE
        if name in ("variation", "low_variation", "high_variation"):
            return TaskKind.VARIATION
        if name == "reroll":
            return TaskKind.REROLL
        if name in ("pan_left", "pan_right", "pan_up", "pan_down"):
            return TaskKind.PAN
        if name in ("picreader", "promptanalyzer"):
            return TaskKind.IMAGINE if len(parts) == 4 and parts[3].isascii() and parts[3].isdigit() else None
        return None
    if family in ("OUTPAINT", "CUSTOMZOOM"):
        return TaskKind.ZOOM
    if family == "INPAINT":
        return TaskKind.VARY_REGION
    if family == "PICREAD" and name == "retry":
        return TaskKind.DESCRIBE
    return None


def change_button(custom_ids: Iterable[str], action: Change, index: int | None) -> str | None:
    """The `customId` among a task's buttons that a `submit/change` of `action` (and `index`, 1-4, for an upscale
    or a variation) means: U`index`, V`index` or the re-roll; None when the task has no such button."""
    for custom_id in custom_ids:
        parts = custom_id.split("::")
        if len(parts) < 4 or parts[0] != "MJ" or parts[1].upper() != "JOB":
            continue
        if parts[2].lower() == _CHANGE_NAMES[action] and (action == "REROLL" or parts[3] == str(index)):
            return custom_id
    return None
