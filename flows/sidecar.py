"""The sidecar: one JSON beside each final video that says how it was made.

It names the job, the content hashes of its inputs and weights, the resolved parameters, the
plan and every segment's checkpoint (with the lease epoch that rendered it), the QC figures,
the software versions and the Prefect run, so a studio can trace any delivered video back to
what made it, and render it again.
"""

from __future__ import annotations

from typing import Any

from prefect.runtime import flow_run

from flows.segments import RenderedJob
from flows.versions import software_versions


def build_sidecar(
    done: RenderedJob, qc: dict[str, Any], *, epoch: int, fps: int, run_seconds: float
) -> dict[str, Any]:
    """The sidecar of a finished render (``epoch``: the render's lease epoch)."""
    job = done.job
    return {
        "job_id": job.job_id,
        "name": job.name,
        "batch": job.batch_name,
        "seed": done.params.seed,
        "params": done.params.to_dict(),
        "inputs": {"image_sha256": job.image_sha256, "audio_sha256": job.audio_sha256},
        "weights_sha256": done.weights_sha256,
        "model_config": done.model_config,
        "face_region": {
            "box_in_portrait": done.inputs.face_box,
            "source": done.inputs.face_source,
        },
        "frames": done.plan.total_frames,
        "fps": fps,
        "plan_sha256": done.plan.sha256,
        "lease_epoch": epoch,
        "segments": [
            {
                "index": c.index,
                "manifest_sha256": c.manifest_sha256,
                "epoch": c.manifest.get("epoch"),
                "render_seconds": c.manifest.get("render_seconds"),
            }
            for c in done.checkpoints
        ],
        "segments_rendered_this_run": done.rendered,
        "prefect_flow_run": str(flow_run.id) if flow_run.id else None,
        "qc": qc,
        "software": software_versions(),
        "timings": {"run_seconds": run_seconds},
    }
