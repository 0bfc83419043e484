"""`qwenhw serve` of a vLLM plan hands over to vLLM's own OpenAI server (vllm serve with the plan's
arguments): the tiny Qwen3-MoE on vLLM's CPU platform, started as a user starts it, asked through the
official openai client, stopped with Ctrl-C. vLLM's server takes ~40-60 s to start on the 2-core CI machine."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from urllib.request import urlopen

import openai
import pytest

from qwenhw.backend import importable
from qwenhw.engine.worker import worker_python

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

if not importable("vllm") and worker_python("vllm") is None:
    pytest.skip("vLLM is not importable here and no vllm environment is configured: build it with "
                "`bash ci/envs/vllm.sh .venvs/vllm` and export QWENHW_VLLM_PYTHON=$PWD/.venvs/vllm/bin/python",
                allow_module_level=True)


def test_serve_hands_a_vllm_plan_to_vllms_own_server(tiny_moe):
    env = {**os.environ, "QWENHW_QUIET": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HOST_IP": "127.0.0.1"}
    proc = subprocess.Popen([sys.executable, "-m", "qwenhw.cli", "serve", str(tiny_moe), "--backend", "vllm",
                             "--port", "0", "--served-model-name", "t", "--api-key", "k", "--context", "512"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    try:
        banner = proc.stderr.readline()
        found = re.search(r"its own OpenAI server at (http://127\.0\.0\.1:\d+/v1)", banner)
        assert found, banner
        url = found.group(1)
        deadline = time.time() + 300
        while time.time() < deadline:
            assert proc.poll() is None, "vLLM's server exited early"
            try:
                with urlopen(url.removesuffix("/v1") + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(1)
        client = openai.OpenAI(base_url=url, api_key="k", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == ["t"]
        r = client.chat.completions.create(model="t", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                           temperature=0, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
        assert r.usage.completion_tokens == 4 and r.choices[0].finish_reason == "length"
        with pytest.raises(openai.AuthenticationError):  # the plan's --api-key reached vLLM
            openai.OpenAI(base_url=url, api_key="nope", max_retries=0).models.list()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        proc.stderr.close()
    assert code == 0
