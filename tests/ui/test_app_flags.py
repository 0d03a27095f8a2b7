"""Launch flags: --share without --auth is refused with the reason; defaults bind 127.0.0.1."""
import subprocess
import sys
from pathlib import Path

import app

ROOT = Path(__file__).resolve().parents[2]


def test_share_without_auth_is_refused_with_reason():
    out = subprocess.run([sys.executable, "app.py", "--share"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "--auth" in out.stderr and "--share-without-auth" in out.stderr
    assert "Traceback" not in out.stderr


def test_share_rules():
    assert app.check_share(app.parse_args(["--share", "--auth", "me:pw"])) is None
    assert app.check_share(app.parse_args(["--share", "--share-without-auth"])) is None
    assert "USER:PASS" in app.check_share(app.parse_args(["--auth", "nopassword"]))
    args = app.parse_args([])
    assert not args.listen and args.server_port == 7860



def test_page_builds_without_models_and_exposes_only_named_endpoints(tmp_path):
    from ui import build_ui

    from fake_engine import FakeEngine

    demo = build_ui(FakeEngine(tmp_path, models=[]))
    assert demo.analytics_enabled is False
    public = {fn.api_name for fn in demo.fns.values() if fn.api_visibility == "public"}
    assert public == {"generate", "models", "loras", "presets"}

