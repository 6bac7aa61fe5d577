"""The Ray Serve application: the ``Gateway`` HTTP ingress bound to the batched ``Editor``.

    serve deploy serve/config.yaml            # or: icd serve up (the local stack)

``serve/editor.py`` is the model deployment, ``serve/gateway.py`` the HTTP API and the page,
``serve/bodies.py`` the request forms (JSON or multipart), ``serve/latents.py`` the store of
inverted latents behind ``latent_id``, ``serve/examples.py`` the page's example pictures.
"""

from ray import serve

from serve.gateway import Gateway
from serve.editor import Editor

GATEWAY_ARGS = ("latent_ttl_s", "max_body_bytes", "examples")


def build_app(args: dict) -> "serve.Application":
    """``serve deploy`` / ``serve.run`` entry.

    args: ``model_uri``; optional ``editor_options`` / ``gateway_options`` (deployment options,
    e.g. user_config, or a runtime_env with ICD_SERVE_API_KEY); ``latent_ttl_s`` (how long an
    inverted latent is kept, default 24 h), ``max_body_bytes`` (413 above, default 16 MiB),
    ``examples`` (the page's pictures: ``{source: shapes, count: 6}`` or
    ``{source: generate, prompts: [{prompt, target}, ...]}``).
    """
    unknown = set(args) - {"model_uri", "editor_options", "gateway_options", *GATEWAY_ARGS}
    if unknown:
        raise ValueError(f"serve app args: unknown {sorted(unknown)}; expected model_uri, editor_options, "
                         f"gateway_options, {', '.join(GATEWAY_ARGS)}")
    editor = Editor.options(**(args.get("editor_options") or {})).bind(args.get("model_uri"))
    gateway_args = {name: args[name] for name in GATEWAY_ARGS if name in args}
    return Gateway.options(**(args.get("gateway_options") or {})).bind(editor, **gateway_args)


app = build_app
