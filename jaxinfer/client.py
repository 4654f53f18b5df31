"""`python -m jaxinfer.client`: talk to a `jaxinfer.serve` server.

    python -m jaxinfer.client --target localhost:50051 "Once upon a time"       # streams text to the terminal
    python -m jaxinfer.client --target localhost:50051 --json --max-tokens 20 "Hi"  # one JSON object per response
    python -m jaxinfer.client --target localhost:50051 --chat "What is 2+2?"     # as a user chat message
    python -m jaxinfer.client --target localhost:50051 --info                    # GetModelInfo

Exit status: 0 on success, 1 when the server answers with an error status (printed as CODE: details).
"""

from __future__ import annotations

import argparse
import json
import sys

import grpc
from google.protobuf import json_format

from jaxinfer.proto import jaxinfer_pb2 as pb
from jaxinfer.proto import jaxinfer_pb2_grpc


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
    return p


def build_request(args) -> pb.GenerateRequest:
    params = pb.SamplingParams(
        stop=args.stop, stop_token_ids=args.stop_token_id, ignore_eos=args.ignore_eos, logprobs=args.logprobs
    )
    for name in ("max_tokens", "temperature", "top_k", "top_p", "min_p", "seed"):
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


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.prompt is None and not args.info:
        print("jaxinfer.client: error: give a prompt (or --info)", file=sys.stderr)
        return 2
    with grpc.insecure_channel(args.target) as channel:
        stub = jaxinfer_pb2_grpc.GenerationStub(channel)
        try:
            if args.info:
                print(_json(stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=args.timeout)))
                return 0
            request = build_request(args)
            if args.unary:
                responses = [stub.GenerateUnary(request, timeout=args.timeout)]
            else:
                responses = stub.Generate(request, timeout=args.timeout)
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
