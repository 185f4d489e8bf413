"""Start the service from serve_config.yaml the way `serve run` does, with overrides.

Used by `python -m serve_graph serve`, by the Modal container and by the tests, so every one of
them runs the same config through the same `build_app`.
"""
import os
import subprocess
import sys
import typing as tp
from pathlib import Path

import yaml

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "serve_config.yaml"


def write_config(path: tp.Union[str, Path], source: tp.Union[str, Path] = DEFAULT_CONFIG,
                 port: tp.Optional[int] = None, host: tp.Optional[str] = None,
                 args: tp.Optional[dict] = None,
                 deployments: tp.Optional[tp.Dict[str, dict]] = None) -> Path:
    """Write `source` to `path` with another HTTP port/host, application `args` and
    per-deployment overrides (`{"Separate": {"num_replicas": 2, "user_config": {...}}}`;
    dict values are merged one level deep)."""
    config = yaml.safe_load(Path(source).read_text())
    if port is not None:
        config["http_options"]["port"] = port
    if host is not None:
        config["http_options"]["host"] = host
    application = config["applications"][0]
    application["args"].update(args or {})
    for deployment in application["deployments"]:
        for key, value in (deployments or {}).get(deployment["name"], {}).items():
            if isinstance(value, dict) and isinstance(deployment.get(key), dict):
                deployment[key] = {**deployment[key], **value}
            else:
                deployment[key] = value
    Path(path).write_text(yaml.safe_dump(config, sort_keys=False))
    return Path(path)


def serve_command(config: tp.Union[str, Path]) -> tp.List[str]:
    """`serve run <config>` with this interpreter's Ray."""
    return [sys.executable, "-m", "ray.serve.scripts", "run", str(config)]


def launch(config: tp.Union[str, Path] = DEFAULT_CONFIG, env: tp.Optional[dict] = None,
           **popen) -> subprocess.Popen:
    """Start `serve run <config>` in the background (own process group) and return it."""
    full_env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", **(env or {}))
    return subprocess.Popen(serve_command(config), env=full_env, start_new_session=True,
                            cwd=Path(config).resolve().parent, **popen)
