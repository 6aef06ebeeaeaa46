"""A native request for a bot no configured provider runs: a refusal of the request, not a busy relay."""

from __future__ import annotations

from pathlib import Path

from tests.api.native_helpers import native
from tests.helpers import sql


def test_a_bot_no_provider_runs_is_refused_not_answered_as_busy(tmp_path: Path) -> None:
    """Every provider runs Midjourney only: a `NIJI_JOURNEY` imagine can never be taken, however often it is sent.
    It was priced at the first model of its mode, held, routed to no provider and answered 503 "try again shortly"
    (code 23, `Retry-After`), which a client retries for ever."""
    with native(tmp_path, provider_settings={"bots": ["MID_JOURNEY"]}) as world:
        reply = world.post("/submit/imagine", {"prompt": "a fox", "botType": "NIJI_JOURNEY"})
        assert reply.status_code == 400, reply.text
        assert reply.json()["code"] == 4, reply.text
        assert "retry-after" not in reply.headers
        assert sql(world.relay.config, "SELECT COUNT(*) FROM jobs") == [(0,)]  # nothing held
        assert world.relay.balance() == (1000, 0)
        world.finished(world.submit("/submit/imagine", {"prompt": "a fox", "botType": "MID_JOURNEY"}))
