"""The `sampling` config section: the defaults of `gptstack chat`, `gptstack sample` and the chat and
compare views of `gptstack serve`, changed by `--set sampling.KEY=VALUE` and overridden by flags."""
from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import torch

from gptstack.cli import build_parser, main
from gptstack.config import SamplingConfig, build_config

sys.path.insert(0, str(Path(__file__).parent))
from serve_run import make_run  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return make_run(tmp_path_factory.mktemp("sampling") / "run", xss=False, rm=False)


@pytest.fixture
def temperatures(monkeypatch) -> list[float]:
    """The temperature of every engine call: chat's (through engine.chat) and sample's."""
    import gptstack.engine as engine
    import gptstack.engine.chat as engine_chat

    seen: list[float] = []
    real = engine.generate

    def spy(*args, **kwargs):
        seen.append(kwargs["temperature"])
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "generate", spy)
    monkeypatch.setattr(engine_chat, "generate", spy)
    return seen


def test_the_defaults_are_one_section_shown_by_help(capsys):
    cfg = build_config("tiny")
    assert cfg.sampling == SamplingConfig(temperature=0.7, top_k=0, top_p=1.0, max_new_tokens=128, seed=0)
    for command in ("chat", "sample"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "default: sampling.temperature = 0.7" in text and "default: sampling.max_new_tokens = 128" in text


def test_chat_and_sample_take_the_default_from_set_and_their_flags_win(run_dir, temperatures, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is 2 + 3?\n"))
    assert main(["chat", str(run_dir / "sft"), "--max-new-tokens", "4", "--set", "sampling.temperature=1.3"]) == 0
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is 2 + 3?\n"))
    assert main(["chat", str(run_dir / "sft"), "--max-new-tokens", "4", "--set", "sampling.temperature=1.3",
                 "--temperature", "0.2"]) == 0
    assert main(["sample", str(run_dir / "sft"), "--max-new-tokens", "4", "--set", "sampling.temperature=0.4"]) == 0
    assert main(["sample", str(run_dir / "sft"), "--max-new-tokens", "4"]) == 0
    assert temperatures == [1.3, 0.2, 0.4, 0.7]
    assert main(["sample", str(run_dir / "sft"), "--set", "sampling.temperature=-1"]) == 2
    assert "sampling.temperature: expected a value in [0, 10], got -1" in capsys.readouterr().err


def test_serve_takes_the_default_from_set(run_dir, temperatures, monkeypatch):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    import gptstack.serve.app as app_module

    seen = {}
    monkeypatch.setattr(app_module, "serve", lambda run, cfg, host, port, token: seen.update(cfg=cfg))
    assert main(["serve", str(run_dir), "--set", "sampling.temperature=1.1"]) == 0
    cfg = seen["cfg"]
    assert cfg.sampling.temperature == 1.1
    client = TestClient(app_module.create_app(run_dir, cfg), base_url="http://127.0.0.1")
    assert client.get("/api/info").json()["sampling"]["temperature"] == 1.1   # the page's inputs start here
    r = client.post("/api/chat", json={"stage": "sft", "messages": [{"role": "user", "content": "hi"}],
                                       "max_new_tokens": 3})
    assert r.status_code == 200 and "event: done" in r.text
    assert client.post("/api/compare", json={"prompt": "hi", "stages": ["sft"], "max_new_tokens": 3}).status_code == 200
    assert client.post("/api/compare", json={"prompt": "hi", "stages": ["sft"], "max_new_tokens": 3,
                                             "temperature": 0.5}).status_code == 200
    assert temperatures == [1.1, 1.1, 0.5]
