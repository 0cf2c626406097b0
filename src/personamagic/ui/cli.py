"""The `ui` command: `personamagic ui [--host 127.0.0.1] [--port 7860] [--library FOLDER] ...`.

Only argparse here at import time, so `personamagic --help` stays instant; Gradio and torch are
imported when the command runs.
"""

from __future__ import annotations

import argparse
import logging

from .. import DEFAULT_BASE_MODEL
from ..cli.argtypes import port, positive_float

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_LIBRARY = "personamagic-library"

logger = logging.getLogger(__name__)


def add_parser(commands) -> argparse.ArgumentParser:
    """Register `ui` on the main parser's subcommands."""
    ui = commands.add_parser("ui", help="start the web UI (local only by default)")
    ui.add_argument("--host", default=DEFAULT_HOST,
                    help=f"address to listen on ({DEFAULT_HOST}: this computer only; 0.0.0.0: the network)")
    ui.add_argument("--port", type=port, default=DEFAULT_PORT, help=f"port ({DEFAULT_PORT})")
    ui.add_argument("--library", default=DEFAULT_LIBRARY,
                    help=f"folder of concepts and generated images (./{DEFAULT_LIBRARY})")
    ui.add_argument("--model", default=DEFAULT_BASE_MODEL,
                    help="base model offered first: hub id, diffusers folder, .safetensors/.ckpt file, or tiny")
    ui.add_argument("--max-upload-mb", type=positive_float, default=50, help="largest photo accepted, in MB (50)")
    ui.add_argument("--share", action="store_true",
                    help="also publish the page on a public gradio.live link (anyone with the link can use it)")
    ui.add_argument("--device", default="auto", help="auto (CUDA > MPS > CPU), cpu, cuda, cuda:N, mps")
    ui.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                    help="weights' precision; auto = bf16/fp16 on CUDA, fp32 elsewhere")
    ui.add_argument("--local-files-only", action="store_true", help="never download; use the local hub cache")
    return ui


def run(args) -> int:
    """Serve the page until Ctrl-C (or SIGTERM); a running job stops at its next step, leaving nothing."""
    from .app import build_app, launch_kwargs
    from .studio import Library, Studio

    studio = Studio(Library(args.library), device=args.device, dtype=args.dtype,
                    local_files_only=args.local_files_only, max_upload_mb=args.max_upload_mb)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("listening on %s: anyone who can reach this port can use the UI and read the library",
                       args.host)
    demo = build_app(studio, default_model=args.model)
    try:
        _, local_url, share_url = demo.launch(
            **launch_kwargs(studio, host=args.host, port=args.port, share=args.share),
            prevent_thread_lock=True, quiet=True,
        )
        print(f"PersonaMagic UI: {local_url}" + (f" and {share_url}" if share_url else ""))
        print(f"library: {studio.library.root} (Ctrl-C to stop)")
        wait_for_interrupt()
    except KeyboardInterrupt:
        pass
    finally:
        demo.close()
        studio.close()
    return 0


def wait_for_interrupt() -> None:
    """Block until Ctrl-C or SIGTERM (both arrive as KeyboardInterrupt, so the cleanup runs)."""
    import signal
    import threading

    def terminate(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    threading.Event().wait()
