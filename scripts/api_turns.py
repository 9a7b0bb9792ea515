"""A stateless three-turn conversation on the FAQ preset through the official openai SDK, streamed
with usage: what each turn reused, and time to first token as the engine and as the client saw it.

    python app.py &            # then:
    python scripts/api_turns.py --url http://127.0.0.1:7860
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import openai

FAQ = Path(__file__).resolve().parent.parent / "assets" / "presets" / "3-acme-cloud-support-faq-long.md"
QUESTIONS = ["How much does the Team plan cost?", "What happens if a card payment fails?", "Do you refund yearly plans?"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:7860")
    parser.add_argument("--api-key", default="unused")
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    args = parser.parse_args()
    client = openai.OpenAI(base_url=args.url.rstrip("/") + "/v1", api_key=args.api_key)
    messages = [{"role": "system", "content": FAQ.read_text().strip()}]
    for turn, question in enumerate(QUESTIONS, 1):
        messages.append({"role": "user", "content": question})
        started, first, text, usage = time.perf_counter(), None, "", None
        for chunk in client.chat.completions.create(model=args.model, messages=messages, max_tokens=32, temperature=0,
                                                    stream=True, stream_options={"include_usage": True}):  # fmt: skip
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                text += chunk.choices[0].delta.content
            usage = chunk.usage or usage
        extra = usage.model_extra["kvchat"]
        print(f"turn {turn}: prompt {usage.prompt_tokens}, cached {usage.prompt_tokens_details.cached_tokens} "
              f"({extra['cache_source']}); TTFT {extra['ttft_ms']:.0f} ms in the engine, "
              f"{(first - started) * 1000:.0f} ms at the client")  # fmt: skip
        messages.append({"role": "assistant", "content": text})


if __name__ == "__main__":
    main()
