"""The model deployment: one batched, autoscaled ``Editor`` per replica (GPU in production).

``Editor`` holds the model (``models:/icd-<preset>@champion`` from the MLflow registry, or a
stage output's manifest) and batches invert / decode / edit requests with ``@serve.batch``:
requests with different prompts, guidance scales and seeds share one UNet pass per step.
``reconfigure`` (a new ``user_config``, e.g. after the alias moved) loads the new model beside the
old one and swaps them; requests in flight finish on the model they started with.
"""

import logging
import os
from dataclasses import dataclass

from ray import serve

log = logging.getLogger("ray.serve")

# Batch queue defaults; user_config max_batch_size / batch_wait_timeout_s change them per deployment.
# No wait by default: under load the requests that arrive during a batch form the next one anyway,
# and at low load a 20 ms wait cost ~100 ms per call here (measured through a handle on the toy preset).
MAX_BATCH_SIZE, BATCH_WAIT_S = 8, 0.0


@dataclass
class LoadedModel:
    pipeline: object  # icd.editing.pipeline.EditPipeline
    name: str
    version: str
    source: str


def resolve(model_uri: str, pinned: str | None = None) -> tuple[str, str]:
    """(name, version) that ``model_uri`` names right now, or at the ``pinned`` registry version."""
    if model_uri.startswith("models:/"):
        import mlflow

        name, _, ref = model_uri.removeprefix("models:/").partition("@")
        name, _, version = name.partition("/")
        if pinned:
            return name, str(pinned)
        if ref:
            return name, str(mlflow.MlflowClient().get_model_version_by_alias(name, ref).version)
        return name, version
    from icd.train.stages import read_stage_manifest

    manifest = read_stage_manifest(model_uri)
    if manifest is None:
        raise ValueError(f"model_uri {model_uri!r}: expected models:/<name>@<alias> or a stage output with manifest.json")
    return manifest["stage"], manifest["identity"]


def load_model(model_uri: str, version: str | None = None) -> LoadedModel:
    """``models:/<name>@<alias>`` or ``models:/<name>/<version>`` through MLflow, or a stage manifest URI.

    ``version`` pins the registry version an alias was resolved to by whoever deployed the config.
    """
    name, version = resolve(model_uri, version)
    if model_uri.startswith("models:/"):
        import mlflow

        model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
        note_format(name, version)
        return LoadedModel(model.unwrap_python_model().pipeline, name, version, model_uri)
    from icd.config import load_config
    from icd.editing.pipeline import EditPipeline, inference_placement
    from icd.train.stages import read_stage_manifest

    manifest = read_stage_manifest(model_uri)
    config = load_config(os.environ.get("ICD_SERVE_CONFIG", "jobs/configs/toy.yaml"))
    device, dtype = inference_placement(config.model.mixed_precision)
    pipeline = EditPipeline.from_manifest(manifest, config.editing, config.model.resolution, device=device,
                                          dtype=dtype, serving=config.serving)
    return LoadedModel(pipeline, manifest["stage"], manifest["identity"], model_uri)


def note_format(name: str, version: str) -> None:
    """Tag a pickled (pre models-from-code) version as such; serving goes on if the registry refuses the tag."""
    import mlflow

    from icd.registry.model import tag_pickled_version

    try:
        if tag_pickled_version(mlflow.MlflowClient(), name, version):
            log.warning("serving %s version %s, logged as a pickle (see its icd.note tag)", name, version)
    except Exception as exc:  # a read-only registry user, say: the note is not worth failing a deployment
        log.warning("could not tag %s version %s with its format: %s", name, version, exc)


@dataclass
class Job:
    kind: str  # "invert", "decode", or an edit mode
    image: object = None  # PIL image (invert)
    latents: object = None  # (1, C, h, w) tensor (decode)
    prompt: str = ""  # the source prompt of an edit
    target: str = ""
    guidance: float = 0.0
    tau: float | None = None
    seed: int = 0
    model: LoadedModel | None = None


@serve.deployment(max_ongoing_requests=16, ray_actor_options={"num_cpus": 0.75},
                  autoscaling_config={"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 8})
class Editor:
    """The batched model; GPU replicas in production (num_gpus: 1), CPU on the toy preset.

    ``max_ongoing_requests`` (16) is at least the batch size (8), so a replica can fill a batch.
    """

    def __init__(self, model_uri: str | None = None):
        self.model: LoadedModel | None = None
        self.refused_update: str | None = None  # why the last model swap was refused (the old model serves)
        self.calls = 0  # batched model calls, for tests and metrics
        self.max_batch_size = MAX_BATCH_SIZE
        if model_uri:
            self.model = load_model(model_uri)

    def reconfigure(self, user_config: dict) -> None:
        """Serve ``user_config.model_uri`` (at ``model_version`` when given; else what the alias names now).

        A no-op when that is the model served. The new model is built before the swap; requests in
        flight keep their reference to the old one and finish on it. A model that does not load is
        refused: a replica that serves nothing yet fails to start, one that serves a model keeps it
        and reports the refusal in `info` (``refused_update``). It does not raise then, because Serve
        stops a replica whose reconfigure raises and starts new ones that fail the same way: a broken
        version would take the service down.
        """
        self._set_batching(user_config)
        uri = user_config.get("model_uri") or (self.model.source if self.model else None)
        if not uri:
            return
        pinned = user_config.get("model_version")
        wanted = resolve(uri, pinned)
        if self.model is None or wanted != (self.model.name, self.model.version):
            try:
                loaded = load_model(uri, pinned)
            except Exception as exc:  # a broken version: refuse the swap, keep serving the old model
                serving = f"; still serving {self.model.name} version {self.model.version}" if self.model else ""
                message = f"cannot serve {uri} = {wanted[0]} version {wanted[1]}: {type(exc).__name__}: {exc}{serving}"
                if self.model is None:
                    raise RuntimeError(message) from exc
                log.error("%s", message)
                self.refused_update = message
                return
            self.model = loaded
        self.refused_update = None

    def _set_batching(self, user_config: dict) -> None:
        """``user_config.max_batch_size`` / ``batch_wait_timeout_s``: the knobs of every batch queue."""
        size, wait = user_config.get("max_batch_size"), user_config.get("batch_wait_timeout_s")
        if size is not None and (not isinstance(size, int) or size < 1):
            raise ValueError(f"user_config.max_batch_size: expected an integer >= 1, got {size!r}")
        if wait is not None and (not isinstance(wait, (int, float)) or wait < 0):
            raise ValueError(f"user_config.batch_wait_timeout_s: expected seconds >= 0, got {wait!r}")
        for queue in (self.invert, self.decode, self.edits):
            if size is not None:
                queue.set_max_batch_size(size)
            if wait is not None:
                queue.set_batch_wait_timeout_s(float(wait))
        if size is not None:
            self.max_batch_size = size

    def info(self) -> dict:
        if self.model is None:
            return {"loaded": False}
        from icd.models.fused import FusedBundle

        pipeline = self.model.pipeline
        unet = pipeline.bundle.unet.config
        return {"loaded": True, "name": self.model.name, "version": self.model.version, "source": self.model.source,
                "resolution": pipeline.resolution, "steps": len(pipeline.boundaries.reverse_timesteps),
                "latent_size": unet.sample_size, "latent_channels": unet.in_channels, "calls": self.calls,
                "max_batch_size": self.max_batch_size, "fused": isinstance(pipeline.bundle, FusedBundle),
                "weights_bytes": pipeline.memory(), "refused_update": self.refused_update}

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_S)
    async def invert(self, jobs: list[Job]) -> list[tuple]:
        from icd.editing.pipeline import invert_batch

        def run(model, group):
            out = invert_batch(model.pipeline, [j.image for j in group], [j.prompt for j in group],
                               [j.seed for j in group])
            return [(out.latents[i:i + 1].cpu(), out.nfe) for i in range(len(group))]
        return self._by_model(jobs, run)

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_S)
    async def decode(self, jobs: list[Job]) -> list[tuple]:
        import torch

        from icd.editing.pipeline import decode_batch

        def run(model, group):
            out = decode_batch(model.pipeline, torch.cat([j.latents for j in group]), [j.prompt for j in group],
                               [j.guidance for j in group], [j.tau for j in group])
            return [(out.images[i:i + 1].cpu(), out.nfe) for i in range(len(group))]
        return self._by_model(jobs, run)

    def _by_model(self, jobs: list[Job], run) -> list:
        """Run each model's jobs as one batch (a swap can leave two models in one batch)."""
        results: list = [None] * len(jobs)
        groups: dict[int, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(id(job.model), []).append(i)
        for indices in groups.values():
            self.calls += 1
            for i, result in zip(indices, run(jobs[indices[0]].model, [jobs[i] for i in indices])):
                results[i] = result
        return results

    def current(self) -> LoadedModel:
        if self.model is None:
            raise RuntimeError("no model loaded: set user_config.model_uri")
        return self.model

    async def run_invert(self, image, prompt: str, seed: int) -> tuple:
        model = self.current()
        latents, nfe = await self.invert(Job("invert", image=image, prompt=prompt, seed=seed, model=model))
        return latents, nfe, model.version

    async def run_decode(self, latents, prompt: str, guidance: float, tau, version: str | None = None) -> tuple:
        model = self.current()
        images, nfe = await self.decode(Job("decode", latents=latents, prompt=prompt, guidance=guidance, tau=tau,
                                            model=model))
        return images, nfe, model.version

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_S)
    async def edits(self, jobs: list[Job]) -> list[tuple]:
        """Edits of images in one call: inversion and decoding without a second queue or hop.

        ``switch`` edits share one batch whatever their w, tau and seed (per-sample guidance);
        ``p2p`` / ``guided`` edits share one when their mode, w, tau and seed match.
        """
        from icd.editing.pipeline import decode_batch, invert_batch, to_pictures

        results: list = [None] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            key = (id(job.model), "switch") if job.kind == "switch" else \
                (id(job.model), job.kind, job.guidance, job.tau, job.seed)
            groups.setdefault(key, []).append(i)
        for key, indices in groups.items():
            self.calls += 1
            group = [jobs[i] for i in indices]
            pipeline = group[0].model.pipeline
            if key[1] == "switch":
                inverted = invert_batch(pipeline, [j.image for j in group], [j.prompt for j in group],
                                        [j.seed for j in group])
                out = decode_batch(pipeline, inverted.latents, [j.target for j in group], [j.guidance for j in group],
                                   [j.tau for j in group])
                pictures, nfe = to_pictures(out.images, [j.image.size for j in group]), inverted.nfe + out.nfe
            else:
                out = pipeline.edit([j.image for j in group], [j.prompt for j in group], [j.target for j in group],
                                    guidance=key[2], tau=key[3], mode=key[1], seed=key[4])
                pictures, nfe = out.images, out.nfe
            for i, picture in zip(indices, pictures):
                results[i] = (picture, nfe)
        return results

    async def run_edit(self, image, source: str, target: str, guidance: float, tau, seed: int, mode: str) -> tuple:
        """One edit of an image -> (picture at the image's size, NFE, model version)."""
        model = self.current()
        picture, nfe = await self.edits(Job(mode, image=image, prompt=source, target=target, guidance=guidance,
                                            tau=tau, seed=seed, model=model))
        return picture, nfe, model.version
