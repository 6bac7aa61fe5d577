"""The ``icd`` command: ``icd stack ...`` for the local stack, ``icd serve ...`` for the Serve app on it,
``icd config show`` for configs."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from pydantic import ValidationError


def _stack_settings():
    from icd.stack import StackError, StackSettings

    try:
        return StackSettings(_env_file=os.environ.get("ICD_ENV_FILE", ".env"))
    except ValidationError as exc:
        err = exc.errors()[0]
        field = "ICD_" + "_".join(str(p) for p in err["loc"]).upper()
        raise StackError(f"{field}={err.get('input')!r}: {err['msg']}") from None


def _stack(args: argparse.Namespace) -> int:
    from icd import stack

    if args.action == "init-env":
        path = Path(args.env_file)
        if path.exists() and not args.force:
            print(f"{path} exists; keeping it (use --force to overwrite)")
            return 0
        path.write_text(stack.new_env_file_text())
        path.chmod(0o600)
        print(f"wrote {path} with fresh S3 credentials")
        return 0

    settings = _stack_settings()
    if args.action == "up":
        stack.up(settings)
        print(f"stack is up; state in {settings.state_dir}. For clients: eval \"$(icd stack env)\"")
    elif args.action == "down":
        stack.down(settings)
    elif args.action == "status":
        rows = stack.status(settings)
        for row in rows:
            pid = f"pid {row.pid}" if row.pid else "-"
            print(f"{row.name:7s} {row.state:10s} {pid:11s} {row.url}")
        return 0 if all(r.state == "healthy" for r in rows) else 3
    elif args.action == "env":
        for key, value in settings.client_env().items():
            print(f"export {key}={shlex.quote(value)}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from icd.stack import serving

    settings = _stack_settings()
    if args.action == "up":
        info = serving.up(settings, Path(args.config), model_uri=args.model_uri)
        print(serving.describe(info))
        print(f"serving {info.get('name')} version {info.get('version')} at {info['url']} (API docs: {info['docs']})")
    elif args.action == "down":
        serving.down(settings)
        print("Serve applications deleted; the stack keeps running")
    elif args.action == "status":
        print(serving.describe(serving.status(settings)))
    return 0


def _config(args: argparse.Namespace) -> int:
    from icd.config import load_config

    cfg = load_config(args.config, args.set)
    print(cfg.to_yaml(), end="")
    print(f"# config hash: {cfg.hash()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="icd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p_stack = sub.add_parser("stack", help="the local stack: S3 (SeaweedFS), MLflow, Ray head")
    p_stack.add_argument("action", choices=["up", "down", "status", "env", "init-env"])
    p_stack.add_argument("--env-file", default=".env", help="for init-env: where to write (default .env)")
    p_stack.add_argument("--force", action="store_true", help="for init-env: overwrite an existing file")
    p_stack.set_defaults(func=_stack)

    p_serve = sub.add_parser("serve", help="the Serve application (serve/config.yaml) on the local stack")
    p_serve.add_argument("action", choices=["up", "down", "status"])
    p_serve.add_argument("--config", default=str(Path("serve") / "config.yaml"),
                         help="a Serve config (default serve/config.yaml)")
    p_serve.add_argument("--model-uri", help="serve this model instead of the config's user_config.model_uri "
                                              "(models:/<name>@<alias>, models:/<name>/<version> or a stage output)")
    p_serve.set_defaults(func=_serve)

    p_config = sub.add_parser("config", help="configs")
    p_config.add_argument("action", choices=["show"])
    p_config.add_argument("--config", help="a YAML preset, e.g. jobs/configs/toy.yaml")
    p_config.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                          help="override a field, e.g. --set train.icd.lr=1e-4 (repeatable)")
    p_config.set_defaults(func=_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    from icd.config import ConfigError
    from icd.stack import StackError
    from icd.storage import StorageError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (StackError, ConfigError, StorageError) as exc:
        print(f"icd {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
