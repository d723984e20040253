"""Job records for /api/jobs: one view over the running queue, the pending queue and the history.

Shapes follow ComfyUI's newest server (compat §1.2/§2): `{id, status, priority, create_time,
execution_start_time, execution_end_time, execution_error, outputs_count, preview_output, workflow_id}`
with null fields left out. Status: running -> in_progress, queued -> pending, history `success` ->
completed, `error` with an `execution_interrupted` message -> cancelled, other errors -> failed.
"""

from __future__ import annotations

from typing import Any

PENDING = "pending"
IN_PROGRESS = "in_progress"
COMPLETED = "completed"
FAILED = "failed"
CANCELLED = "cancelled"
ALL_STATUSES = (PENDING, IN_PROGRESS, COMPLETED, FAILED, CANCELLED)
SORT_FIELDS = ("created_at", "execution_duration")

# Media kinds the UI can show as a job thumbnail, best first.
_PREVIEWABLE = ("images", "video", "videos", "gifs", "audio", "3d")


def prune(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


def _metadata(extra_data: Any) -> tuple[Any, Any]:
    if not isinstance(extra_data, dict):
        return None, None
    workflow = (extra_data.get("extra_pnginfo") or {}).get("workflow") if isinstance(
        extra_data.get("extra_pnginfo"), dict) else None
    workflow_id = workflow.get("id") if isinstance(workflow, dict) else None
    return extra_data.get("create_time"), workflow_id


def outputs_summary(outputs: Any) -> tuple[int, dict | None]:
    """(number of output items, the item to show as the job's preview or None)."""
    count = 0
    best: tuple[int, dict] | None = None
    if not isinstance(outputs, dict):
        return 0, None
    for node_id, node_output in outputs.items():
        if not isinstance(node_output, dict):
            continue
        for media_type, items in node_output.items():
            # `animated` is a list of flags describing `images`, not outputs of its own.
            if media_type == "animated" or not isinstance(items, list):
                continue
            for item in items:
                count += 1
                if not isinstance(item, dict) or "filename" not in item or media_type not in _PREVIEWABLE:
                    continue
                # Saved outputs beat temp previews; earlier nodes win ties.
                rank = 0 if item.get("type", "output") == "output" else 1
                if best is None or rank < best[0]:
                    best = (rank, {**item, "nodeId": node_id, "mediaType": media_type})
    return count, (best[1] if best else None)


def job_from_queue_item(item: Any, status: str, include_details: bool = False) -> dict:
    number, prompt_id, prompt, extra_data = item[0], item[1], item[2], item[3]
    create_time, workflow_id = _metadata(extra_data)
    job = prune({"id": prompt_id, "status": status, "priority": number, "create_time": create_time,
                 "outputs_count": 0, "workflow_id": workflow_id})
    if include_details:
        job["workflow"] = {"prompt": prompt, "extra_data": extra_data}
    return job


def job_from_history(prompt_id: str, entry: dict, include_details: bool = False) -> dict:
    prompt_tuple = entry.get("prompt") or [None, prompt_id, None, {}, []]
    number, prompt, extra_data = prompt_tuple[0], prompt_tuple[2], prompt_tuple[3]
    create_time, workflow_id = _metadata(extra_data)
    status_info = entry.get("status") or {}
    outputs = entry.get("outputs") or {}
    outputs_count, preview = outputs_summary(outputs)
    start = end = error = None
    interrupted = False
    for message in status_info.get("messages") or []:
        if not isinstance(message, (list, tuple)) or len(message) < 2 or not isinstance(message[1], dict):
            continue
        event, data = message[0], message[1]
        if event == "execution_start":
            start = data.get("timestamp")
        elif event in ("execution_success", "execution_error", "execution_interrupted"):
            end = data.get("timestamp")
            if event == "execution_error":
                error = data
            elif event == "execution_interrupted":
                interrupted = True
    status_str = status_info.get("status_str")
    if status_str == "error":
        status = CANCELLED if interrupted else FAILED
    else:
        status = COMPLETED
    job = prune({"id": prompt_id, "status": status, "priority": number, "create_time": create_time,
                 "execution_start_time": start, "execution_end_time": end, "execution_error": error,
                 "outputs_count": outputs_count, "preview_output": preview, "workflow_id": workflow_id})
    if include_details:
        job["outputs"] = outputs
        job["execution_status"] = status_info
        job["workflow"] = {"prompt": prompt, "extra_data": extra_data}
    return job


def _duration(job: dict) -> float:
    start, end = job.get("execution_start_time"), job.get("execution_end_time")
    if start is None or end is None:
        return 0
    return end - start


def list_jobs(running: list, pending: list, history: dict, statuses: list[str] | None = None,
              workflow_id: str | None = None, sort_by: str = "created_at", sort_order: str = "desc",
              limit: int | None = None, offset: int = 0) -> tuple[list[dict], int]:
    """Filtered, sorted, paginated jobs and the total before pagination."""
    wanted = set(statuses or ALL_STATUSES)
    jobs: list[dict] = []
    if IN_PROGRESS in wanted:
        jobs.extend(job_from_queue_item(i, IN_PROGRESS) for i in running)
    if PENDING in wanted:
        jobs.extend(job_from_queue_item(i, PENDING) for i in pending)
    if wanted & {COMPLETED, FAILED, CANCELLED}:
        for prompt_id, entry in history.items():
            job = job_from_history(prompt_id, entry)
            if job["status"] in wanted:
                jobs.append(job)
    if workflow_id:
        jobs = [j for j in jobs if j.get("workflow_id") == workflow_id]
    if sort_by == "execution_duration":
        key = _duration
    else:
        # Same create_time (or none): queue order (priority) breaks the tie so the order is stable.
        def key(j):
            return (j.get("create_time") or 0, j.get("priority") or 0)
    jobs.sort(key=key, reverse=(sort_order == "desc"))
    total = len(jobs)
    jobs = jobs[offset:] if offset > 0 else jobs
    if limit is not None:
        jobs = jobs[:limit]
    return jobs, total


def find_job(job_id: str, running: list, pending: list, history: dict) -> dict | None:
    if job_id in history:
        return job_from_history(job_id, history[job_id], include_details=True)
    for item in running:
        if item[1] == job_id:
            return job_from_queue_item(item, IN_PROGRESS, include_details=True)
    for item in pending:
        if item[1] == job_id:
            return job_from_queue_item(item, PENDING, include_details=True)
    return None
