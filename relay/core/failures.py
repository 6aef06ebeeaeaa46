"""What a client is told about a job that did not succeed: its failure code, and a message in plain words."""

from __future__ import annotations

from relay.domain import FailureCode
from relay.errors import JobFailed
from relay.store.jobs import JobRow

_MESSAGES = {
    FailureCode.BANNED: "Midjourney refused the prompt: {reason}",
    FailureCode.REJECTED: "The upstream refused the request: {reason}",
    FailureCode.UNAVAILABLE: "No upstream provider could take the job right now; try again shortly.",
    FailureCode.UNCONFIRMED: "The upstream did not confirm the job; it was not sent elsewhere, so it cannot run twice.",
    FailureCode.MODAL: "The upstream asked for a confirmation this request cannot give.",
    FailureCode.TIMEOUT: "The job did not finish before its deadline.",
    FailureCode.LOST: "The upstream lost the job: {reason}",
    FailureCode.DOWNLOAD: "The finished image could not be fetched from the upstream.",
    FailureCode.INTERRUPTED: "The relay stopped before the job was submitted.",
    FailureCode.INTERNAL: "The relay could not finish the job.",
    FailureCode.FAILED: "The Midjourney job failed: {reason}",
}


def code_of(row: JobRow) -> FailureCode:
    try:
        return FailureCode(row.error_code or FailureCode.FAILED.value)
    except ValueError:
        return FailureCode.FAILED


def job_failed(row: JobRow) -> JobFailed:
    code = code_of(row)
    reason = row.fail_reason or "no reason given"
    return JobFailed(code, _MESSAGES[code].format(reason=reason), reason=row.fail_reason)


def request_failed(rows: list[JobRow]) -> JobFailed:
    """The failure a request whose jobs all failed is answered with (`rows`, in plan order): that of a job that may
    have run upstream (its submit was not answered) or may still run there (taken, it passed its deadline) before
    any other, as their answers tell a client not to retry: one told it may would start every job again, that one
    too; else the first."""
    unsure = [row for row in rows if _may_run(row)]
    return job_failed((unsure or rows)[0])


def _may_run(row: JobRow) -> bool:
    code = code_of(row)
    return code is FailureCode.UNCONFIRMED or (code is FailureCode.TIMEOUT and row.upstream_id is not None)
