"""llama.cpp as the peer in `attune bench --llama-cpp`.

Loads the GGUF once, then answers each line on stdin (a JSON list of prompt token ids) with a
JSON line {"prefill": tok/s, "decode": tok/s}: prefill of the whole prompt in one batch, then
greedy decoding of `decode_tokens` tokens one at a time, as the attune bench does.
usage: python llama_cpp_peer.py MODEL.gguf DECODE_TOKENS THREADS
"""

import json
import sys
import time

import numpy as np
from llama_cpp import Llama


def main() -> None:
    path, decode_tokens, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    llm = Llama(
        model_path=path,
        n_ctx=8192,
        n_batch=2048,
        n_ubatch=512,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        prompt = json.loads(line)
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        prefill = time.perf_counter() - start
        next_id = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        start = time.perf_counter()
        for _ in range(decode_tokens):
            llm.eval([next_id])
            next_id = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        decode = time.perf_counter() - start
        print(
            json.dumps({"prefill": len(prompt) / prefill, "decode": decode_tokens / decode}),
            flush=True,
        )


if __name__ == "__main__":
    main()
