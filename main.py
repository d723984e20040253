"""Entry point: `python main.py [flags]` (one process) or `torchrun --nproc_per_node=N main.py [flags]`.

Rank 0 (or the only process) serves the web UI and API and runs the prompt worker; under torchrun the
other ranks run the follower loop of comfy/taco_dit/core/execution_engine.py and execute every prompt
rank 0 hands them, in lockstep.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sys
import threading

import comfy.cli_args as cli_args


def setup_logging(level: str) -> None:
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    logging.basicConfig(level=getattr(logging, level, logging.INFO),
                        format=f"{prefix}%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout if cli_args.args.log_stdout else sys.stderr, force=True)
    # Library chatter is not the user's concern.
    for noisy in ("aiohttp.access", "PIL", "urllib3", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def prepare_directories(args, clear_temp: bool = True) -> None:
    import folder_paths

    folder_paths.configure(args)
    temp = folder_paths.get_temp_directory()
    # Only the process that owns temp/ clears it: a follower rank clearing it would race rank 0.
    if clear_temp and os.path.isdir(temp):
        shutil.rmtree(temp, ignore_errors=True)
    folder_paths.create_directories()


def cache_settings(args) -> tuple[str, dict]:
    if args.cache_none:
        return "none", {}
    if args.cache_lru:
        return "lru", {"lru": args.cache_lru}
    return "classic", {}


def prompt_worker(queue, server, executor) -> None:
    """Takes prompts off the queue and executes them, forever (rank 0 / single process)."""
    from comfy_execution.worker import announce_done, apply_memory_flags, next_prompt

    while True:
        job = next_prompt(queue)
        if job is None:
            continue
        server.last_prompt_id = job.prompt_id
        executor.execute(job.prompt, job.prompt_id, job.extra_data, job.outputs)
        queue.task_done(job.item_id, executor.history_result,
                        status={"status_str": "success" if executor.success else "error",
                                "completed": executor.success,
                                "messages": executor.status_messages})
        announce_done(server, job)
        apply_memory_flags(queue.get_flags(), executor)


def start_server(args, executor_factory=None, worker=None, queue_kwargs=None) -> None:
    """Run rank 0: server, queue and prompt worker. Blocks until interrupted.

    The multi-rank runtime passes its own `worker` (same signature as `prompt_worker`) and
    `queue_kwargs` (the queue's persist path).
    """
    import execution
    import nodes
    import server as server_module

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    prompt_server = server_module.PromptServer(loop)
    queue = execution.PromptQueue(prompt_server, **(queue_kwargs or {}))
    prompt_server.prompt_queue = queue

    nodes.init_extra_nodes(init_custom_nodes=True, disable_all_custom_nodes=args.disable_all_custom_nodes,
                           whitelist=args.whitelist_custom_nodes)
    prompt_server.add_routes()

    cache_type, cache_args = cache_settings(args)
    if executor_factory is None:
        executor = execution.PromptExecutor(prompt_server, cache_type=cache_type, cache_args=cache_args)
    else:
        executor = executor_factory(prompt_server, cache_type, cache_args)
    threading.Thread(target=worker or prompt_worker, args=(queue, prompt_server, executor), daemon=True,
                     name="prompt-worker").start()

    addresses = [(a.strip(), args.port) for a in args.listen.split(",") if a.strip()]
    try:
        loop.run_until_complete(prompt_server.setup())
        loop.run_until_complete(asyncio.gather(prompt_server.start_multi_address(addresses),
                                               prompt_server.publish_loop()))
    except KeyboardInterrupt:
        logging.info("Stopped server")
    finally:
        import folder_paths

        shutil.rmtree(folder_paths.get_temp_directory(), ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    args = cli_args.parse_args(argv)
    setup_logging(args.verbose)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    prepare_directories(args, clear_temp=world_size == 1 or os.environ.get("RANK", "0") == "0")
    import folder_paths
    from comfy.taco_dit.utils import gemm_tuning

    gemm_tuning.configure(os.path.join(folder_paths.get_user_directory(), "taco_gemm"))  # TACO_TUNE_GEMM=1
    # One writer per host (LOCAL_RANK 0); the files land atomically, before any prompt can need them.
    if os.environ.get("LOCAL_RANK", "0") == "0":
        from app import demo

        demo.offer_demo(enabled=not args.no_demo_models)

    if world_size > 1:
        from comfy.taco_dit.core import execution_engine

        execution_engine.run(args, start_server=start_server, cache_settings=cache_settings)
        return
    # One process: the optimization settings (--taco-torch-compile, --taco-cuda-graph, YAML) still apply.
    from comfy.taco_dit.core import model_wrapper
    from comfy.taco_dit.core.config_manager import ConfigError, load_config

    try:
        model_wrapper.set_runtime(load_config(args, world_size=1))
    except ConfigError as e:
        logging.error("TACO-DiT configuration refused: %s", e)
        sys.exit(2)
    start_server(args)


if __name__ == "__main__":
    main()
