"""The buttons a finished simulator task shows, and what pressing one (`submit/action`) makes. Pure, no I/O.

Buttons carry the task's own random message hash, never its id:

    a grid (imagine, variation, reroll, zoom, pan, vary region, blend)
      U1-U4   MJ::JOB::upsample::N::<hash>              V1-V4   MJ::JOB::variation::N::<hash>
      reroll  MJ::JOB::reroll::0::<hash>::SOLO
    an upscale
      MJ::JOB::upsample_v6_2x_subtle|creative::1::<hash>::SOLO    MJ::JOB::low_variation|high_variation::1::<hash>::SOLO
      MJ::Inpaint::1::<hash>::SOLO    MJ::Outpaint::50|75::1::<hash>::SOLO    MJ::CustomZoom::<hash>
      MJ::JOB::pan_left|right|up|down::1::<hash>::SOLO
    a describe:  MJ::Job::PicReader::1..4, MJ::Picread::Retry
    a shorten:   MJ::Job::PromptAnalyzer::1..5
    a face swap: none

    pressed                              makes                                          modal
    upsample::N, upsample_v*             UPSCALE (one image)                            -
    variation, low/high_variation        VARIATION (a grid)                             with remix
    reroll                               REROLL (a grid)                                with remix
    Outpaint                             ZOOM (a grid)                                  -
    CustomZoom                           ZOOM (a grid)                                  always
    pan_*                                PAN (a grid)                                   with remix
    Inpaint                              INPAINT (a grid)                               always, needs a mask
    PicReader::N, PromptAnalyzer::N      IMAGINE of the Nth prompt                      -
    Picread::Retry                       DESCRIBE of the same image                     -
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Shape = Literal["grid", "image", "text"]
Modal = Literal["always", "remix"]


@dataclass(frozen=True, slots=True)
class FollowUp:
    """What a button makes: the new task's action and result, whether it waits in MODAL, which prompt it picks."""

    action: str
    shape: Shape
    modal: Modal | None = None
    pick: int | None = None  # PicReader / PromptAnalyzer: the 1-based prompt of the parent's text result
    every: bool = False  # "Imagine all": one imagine for each prompt, answered with their ids joined by commas
    # new-api's own name of the action, which decides whether it passes a code 21 through (INPAINT, CUSTOM_ZOOM)
    upstream_action: str = ""


def _button(custom_id: str, label: str = "", emoji: str = "") -> dict[str, Any]:
    return {"customId": custom_id, "emoji": emoji, "label": label, "type": 2, "style": 2}


def grid_buttons(hash_: str) -> list[dict[str, Any]]:
    out = [_button(f"MJ::JOB::upsample::{i}::{hash_}", f"U{i}") for i in range(1, 5)]
    out.append(_button(f"MJ::JOB::reroll::0::{hash_}::SOLO", emoji="🔄"))
    out += [_button(f"MJ::JOB::variation::{i}::{hash_}", f"V{i}") for i in range(1, 5)]
    return out


def upscale_buttons(hash_: str) -> list[dict[str, Any]]:
    return [
        _button(f"MJ::JOB::upsample_v6_2x_subtle::1::{hash_}::SOLO", "Upscale (Subtle)"),
        _button(f"MJ::JOB::upsample_v6_2x_creative::1::{hash_}::SOLO", "Upscale (Creative)"),
        _button(f"MJ::JOB::low_variation::1::{hash_}::SOLO", "Vary (Subtle)", "🪄"),
        _button(f"MJ::JOB::high_variation::1::{hash_}::SOLO", "Vary (Strong)", "🪄"),
        _button(f"MJ::Inpaint::1::{hash_}::SOLO", "Vary (Region)", "🖌️"),
        _button(f"MJ::Outpaint::50::1::{hash_}::SOLO", "Zoom Out 2x", "🔍"),
        _button(f"MJ::Outpaint::75::1::{hash_}::SOLO", "Zoom Out 1.5x", "🔍"),
        _button(f"MJ::CustomZoom::{hash_}", "Custom Zoom", "🔍"),
        _button(f"MJ::JOB::pan_left::1::{hash_}::SOLO", emoji="⬅️"),
        _button(f"MJ::JOB::pan_right::1::{hash_}::SOLO", emoji="➡️"),
        _button(f"MJ::JOB::pan_up::1::{hash_}::SOLO", emoji="⬆️"),
        _button(f"MJ::JOB::pan_down::1::{hash_}::SOLO", emoji="⬇️"),
    ]


def describe_buttons() -> list[dict[str, Any]]:
    out = [_button(f"MJ::Job::PicReader::{i}", str(i)) for i in range(1, 5)]
    out.append(_button("MJ::Picread::Retry", emoji="🔄"))
    out.append(_button("MJ::Job::PicReader::all", "Imagine all", "🎉"))
    return out


def shorten_buttons() -> list[dict[str, Any]]:
    return [_button(f"MJ::Job::PromptAnalyzer::{i}", str(i)) for i in range(1, 6)]


def follow_up(custom_id: str) -> FollowUp | None:
    """What pressing a button makes; None for a button the simulator does not run."""
    parts = custom_id.split("::")
    if len(parts) < 3 or parts[0] != "MJ":
        return None
    family, name = parts[1], parts[2]
    if family == "JOB":
        if name == "upsample" or name.startswith("upsample_v"):
            return FollowUp("UPSCALE", "image", upstream_action="UPSCALE")
        if name in ("variation", "low_variation", "high_variation"):
            return FollowUp("VARIATION", "grid", "remix", upstream_action="VARIATION")
        if name == "reroll":
            return FollowUp("REROLL", "grid", "remix", upstream_action="REROLL")
        if name in ("pan_left", "pan_right", "pan_up", "pan_down"):
            return FollowUp("PAN", "grid", "remix", upstream_action="PAN")
        return None
    if family == "Job" and name in ("PicReader", "PromptAnalyzer") and len(parts) == 4 and parts[3].isdigit():
        return FollowUp("IMAGINE", "grid", pick=int(parts[3]), upstream_action="IMAGINE")
    if family == "Job" and name == "PicReader" and parts[3:] == ["all"]:
        return FollowUp("IMAGINE", "grid", every=True, upstream_action="IMAGINE")
    if family == "Picread" and name == "Retry":
        return FollowUp("DESCRIBE", "text", upstream_action="DESCRIBE")
    if family == "Outpaint":
        return FollowUp("ZOOM", "grid", upstream_action="ZOOM")
    if family == "CustomZoom":
        return FollowUp("ZOOM", "grid", "always", upstream_action="CUSTOM_ZOOM")
    if family == "Inpaint":
        return FollowUp("INPAINT", "grid", "always", upstream_action="INPAINT")
    return None
