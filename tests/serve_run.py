"""A tiny run directory for the serve tests, built in seconds:

  RUN/tokenizer   a small BPE trained on world text
  RUN/sft         a random-weight GPT (its samples are distinct gibberish: good for ranking)
  RUN/ppo         a GPT trained to answer XSS_PROMPT with XSS, hostile HTML (greedy decoding)
  RUN/rm          a reward model with a random head (so the Compare view shows an RM score)
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

XSS_PROMPT = "Say hi."
XSS = '<script>alert(1)</script><img src=x onerror="alert(2)"> & <b>bold</b>'
SERVE_SETS = ["serve.k=3", "serve.max_new_tokens=12", "serve.num_prompts=40", "serve.batch=4", "serve.threads=1"]


def make_run(run_dir: Path, xss: bool = True, rm: bool = True) -> Path:
    from gptstack import world
    from gptstack.config import Config
    from gptstack.model.gpt import GPT, GPTConfig
    from gptstack.model.heads import ScalarModel
    from gptstack.rundir import save_scalar_model
    from gptstack.tokenizer import DEFAULT_SPECIALS, Tokenizer
    from gptstack.rundir import save_model

    run_dir = Path(run_dir)
    text = "\n".join(t.prompt + "\n" + t.reference for t in world.train_tasks(200, seed=5)) + "\n" + XSS
    tok = Tokenizer.train([text], 320, pattern="digits", special_tokens=DEFAULT_SPECIALS)
    tok.save(run_dir / "tokenizer")
    cfg = Config(model=GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=128))
    torch.manual_seed(0)
    sft = GPT(cfg.model)
    save_model(run_dir / "sft", sft.state_dict(), cfg.to_dict())
    if xss:
        save_model(run_dir / "ppo", xss_model(tok, cfg.model).state_dict(), cfg.to_dict())
    if rm:
        reward = ScalarModel.from_policy(sft)
        torch.nn.init.normal_(reward.head.weight, std=1.0)
        save_scalar_model(run_dir / "rm", reward, cfg.to_dict())
    return run_dir


def xss_model(tok, config):
    """A GPT that answers XSS_PROMPT with exactly XSS: overfit on that one conversation."""
    from gptstack.engine.chat import stream_reply
    from gptstack.model.gpt import GPT

    torch.manual_seed(1)
    model = GPT(config)
    conv = [{"role": "user", "content": XSS_PROMPT}, {"role": "assistant", "content": XSS}]
    ids, mask = tok.render_conversation(conv)
    x, y = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
    weight = torch.tensor([mask[1:]], dtype=torch.float)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        logits = model(x)
        loss = (torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
                * weight.flatten()).sum() / weight.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.01:
            break
    model.eval()
    reply, finished = stream_reply(model, tok, conv[:1], max_new_tokens=96, temperature=0)
    assert (reply, finished) == (XSS, True), f"the XSS model did not learn its line: {reply!r}"
    return model


# --- a real server process -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`gptstack serve RUN` in a subprocess on a free loopback port."""

    def __init__(self, run_dir: Path, *extra: str, sets=SERVE_SETS):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "gptstack.cli", "serve", str(run_dir), "--port", str(self.port), *extra]
        for s in sets:
            args += ["--set", s]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.log = open(Path(run_dir) / f"serve-{self.port}.log", "w+")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.wait_ready()

    def wait_ready(self, timeout: float = 60.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gptstack serve exited with {self.proc.returncode}: {self.output()}")
            try:
                if httpx.get(self.url + "/api/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"gptstack serve did not answer within {timeout} s: {self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-3000:]

    def kill(self) -> None:
        """kill -9: no shutdown handler runs."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()
