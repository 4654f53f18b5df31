"""`python -m jaxinfer.client`: talk to a `jaxinfer.serve` server.

    python -m jaxinfer.client --target localhost:50051 "Once upon a time"       # streams text to the terminal
    python -m jaxinfer.client --target localhost:50051 --json --max-tokens 20 "Hi"  # one JSON object per response
    python -m jaxinfer.client --target localhost:50051 --chat "What is 2+2?"     # as a user chat message
    python -m jaxinfer.client --target localhost:50051 --info                    # GetModelInfo
    python -m jaxinfer.client --target host:50051 --tls-ca ca.pem --api-key KEY "Hi"   # TLS and an API key

Exit status: 0 on success, 1 when the server answers with an error status (printed as CODE: details).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import grpc
from google.protobuf import json_format

from jaxinfer.proto import jaxinfer_pb2 as pb
from jaxinfer.proto import jaxinfer_pb2_grpc
from jaxinfer.proto.sampling_fields import OPTIONAL_SAMPLING_FIELDS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jaxinfer.client", description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("prompt", nargs="?", help="prompt text")
    p.add_argument("--target", default="localhost:50051", help="server address host:port")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user message (chat template)")
    p.add_argument("--json", action="store_true", help="print each response as one JSON object per line")
    p.add_argument("--unary", action="store_true", help="use GenerateUnary: one response at the end")
    p.add_argument("--info", action="store_true", help="print GetModelInfo and exit")
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    p.add_argument("--request-id", default="")
    p.add_argument("--api-key", default=None, help="sent as 'authorization: Bearer KEY' (default: $JAXINFER_API_KEY)")
    p.add_argument("--tls-ca", default=None, help="PEM certificate(s) to trust: connect with TLS")
    s = p.add_argument_group("sampling (server defaults when left out)")
    s.add_argument("--max-tokens", type=int)
    s.add_argument("--temperature", type=float)
    s.add_argument("--top-k", type=int)
    s.add_argument("--top-p", type=float)
    s.add_argument("--min-p", type=float)
    s.add_argument("--seed", type=int)
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    s.add_argument("--stop-token-id", type=int, action="append", default=[], help="stop token id (repeatable)")
    s.add_argument("--ignore-eos", action="store_true")
    s.add_argument("--logprobs", action="store_true")
    s.add_argument("--top-logprobs", type=int, default=0, help="also the N most likely tokens at each position")
    s.add_argument("--prompt-logprobs", type=int, help="each prompt token's logprob and N alternatives")
    s.add_argument("--presence-penalty", type=float)
    s.add_argument("--frequency-penalty", type=float)
    s.add_argument("--repetition-penalty", type=float)
    s.add_argument(
        "--logit-bias", action="append", default=[], metavar="TOKEN=BIAS", help="add BIAS to TOKEN's logit (repeatable)"
    )
    return p


def _logit_bias(pairs: list[str]) -> dict[int, float]:
    bias = {}
    for pair in pairs:
        token, _, value = pair.partition("=")
        try:
            bias[int(token)] = float(value)
        except ValueError:
            raise ValueError(f"--logit-bias {pair!r} must be TOKEN=BIAS, e.g. 42=-100") from None
    return bias


def build_request(args) -> pb.GenerateRequest:
    params = pb.SamplingParams(
        stop=args.stop,
        stop_token_ids=args.stop_token_id,
        ignore_eos=args.ignore_eos,
        logprobs=args.logprobs,
        top_logprobs=args.top_logprobs,
        logit_bias=_logit_bias(args.logit_bias),
    )
    for name in OPTIONAL_SAMPLING_FIELDS:
        if getattr(args, name) is not None:
            setattr(params, name, getattr(args, name))
    request = pb.GenerateRequest(request_id=args.request_id, params=params)
    if args.chat:
        request.messages.add(role="user", content=args.prompt)
    else:
        request.text = args.prompt
    return request


def _json(message) -> str:
    return json.dumps(json_format.MessageToDict(message, preserving_proto_field_name=True), ensure_ascii=False)


def channel_for(target: str, tls_ca: str | None = None) -> grpc.Channel:
    """A channel to `target`: TLS trusting the PEM file `tls_ca` when given, else plaintext."""
    if tls_ca is None:
        return grpc.insecure_channel(target)
    with open(tls_ca, "rb") as f:
        return grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=f.read()))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.prompt is None and not args.info:
        print("jaxinfer.client: error: give a prompt (or --info)", file=sys.stderr)
        return 2
    try:
        request = build_request(args) if not args.info else None
        channel = channel_for(args.target, args.tls_ca)
    except (ValueError, OSError) as e:
        print(f"jaxinfer.client: error: {e}", file=sys.stderr)
        return 2
    key = args.api_key if args.api_key is not None else os.environ.get("JAXINFER_API_KEY")
    metadata = [("authorization", f"Bearer {key}")] if key else None
    with channel:
        stub = jaxinfer_pb2_grpc.GenerationStub(channel)
        try:
            if args.info:
                print(_json(stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=args.timeout, metadata=metadata)))
                return 0
            if args.unary:
                responses = [stub.GenerateUnary(request, timeout=args.timeout, metadata=metadata)]
            else:
                responses = stub.Generate(request, timeout=args.timeout, metadata=metadata)
            for response in responses:
                if args.json:
                    print(_json(response), flush=True)
                else:
                    print(response.text, end="", flush=True)
                    if response.HasField("usage"):
                        u = response.usage
                        reason = pb.FinishReason.Name(response.finish_reason).removeprefix("FINISH_REASON_").lower()
                        print(
                            f"\n[{reason}: {u.prompt_tokens} prompt ({u.cached_tokens} cached) + "
                            f"{u.completion_tokens} completion tokens, "
                            f"TTFT {u.time_to_first_token_s * 1e3:.0f} ms, total {u.total_time_s:.2f} s, "
                            f"seed {u.seed}]",
                            file=sys.stderr,
                        )
        except grpc.RpcError as e:
            print(f"\njaxinfer.client: error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
