"""``sampler_sync=nccl``: full weights to ``vllm serve`` over vLLM's own weight-transfer API (HTTP control
plane, NCCL data plane), for full fine-tuning on GPUs. The server runs with
``vllm serve STUDENT --weight-transfer-config '{"backend": "nccl"}'`` (and ``VLLM_SERVER_DEV_MODE=1``);
see vLLM's ``examples/rl/rlhf_http_nccl.py``. The trainer is rank 0 of a group with the server's workers
(ranks 1..N); the broadcast itself is vLLM's ``NCCLWeightTransferEngine.trainer_send_weights``.

NOT YET RUN ON A GPU HERE (no device was lent to the sessions that wrote it). The endpoints are vLLM's
(0.16 and later): ``/get_world_size``, ``/init_weight_transfer_engine``, ``/pause``, ``/update_weights``,
``/resume``; later versions bracket the update with ``/start_weight_update`` and ``/finish_weight_update``,
which are called when the server has them.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from opd.errors import OpdError
from opd.models import plain_model
from opd.samplers.remote import RemoteSampler


class NcclSync:
    kind = "nccl"

    def __init__(self, sampler: RemoteSampler, directory: Path, prefix: str) -> None:
        if not torch.cuda.is_available():
            raise OpdError("sampler_sync=nccl sends the weights from a CUDA device over NCCL; there is none here. "
                           "Use sampler_sync=reload with opd serve, or LoRA (sampler_sync=lora)")
        try:
            from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine  # noqa: F401
        except ImportError:
            raise OpdError("sampler_sync=nccl uses vLLM's NCCLWeightTransferEngine on the trainer side: install "
                           "the vLLM version the server runs") from None
        self.sampler, self.group = sampler, None
        self.bracketed = True  # the server has /start_weight_update and /finish_weight_update (newer vLLM)

    def release(self) -> None:
        """Nothing to undo: the engine keeps the last weights pushed."""

    def post(self, path: str, body: dict | None = None) -> dict:
        try:
            return self.sampler.http.request("POST", path, body or {})
        except OpdError as err:
            raise OpdError(f"{err} Start the server with --weight-transfer-config '{{\"backend\": \"nccl\"}}' and "
                           "VLLM_SERVER_DEV_MODE=1 (vLLM's weight-transfer API).") from None

    def connect(self) -> None:
        from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine
        from vllm.utils.network_utils import get_ip, get_open_port

        workers = self.sampler.http.request("GET", "/get_world_size")["world_size"]
        address, port = get_ip(), get_open_port()
        info = {"master_address": address, "master_port": port, "rank_offset": 1, "world_size": workers + 1}
        failure: list[Exception] = []

        def init_server() -> None:
            try:
                self.post("/init_weight_transfer_engine", {"init_info": info})
            except Exception as err:  # noqa: BLE001 - reported after the join
                failure.append(err)

        thread = threading.Thread(target=init_server)
        thread.start()
        self.group = NCCLWeightTransferEngine.trainer_init({"master_address": address, "master_port": port,
                                                            "world_size": workers + 1})
        thread.join()
        if failure:
            raise OpdError(f"the rollout server could not join the weight-transfer group: {failure[0]}")

    @torch.no_grad()
    def push(self, model: torch.nn.Module, version: int) -> None:
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerSendWeightsArgs, NCCLWeightTransferEngine

        if self.group is None:
            self.connect()
        named = list(plain_model(model).named_parameters())
        update = {"names": [n for n, _ in named], "shapes": [list(p.shape) for _, p in named], "packed": True,
                  "dtype_names": [str(p.dtype).removeprefix("torch.") for _, p in named]}
        self.post("/pause")
        try:
            if self.bracketed:
                try:
                    self.post("/start_weight_update", {"is_checkpoint_format": True})
                except OpdError as err:
                    if "HTTP 404" not in str(err):
                        raise
                    self.bracketed = False
            failure: list[Exception] = []

            def receive() -> None:
                try:
                    self.post("/update_weights", {"update_info": update})
                except Exception as err:  # noqa: BLE001
                    failure.append(err)

            thread = threading.Thread(target=receive)
            thread.start()
            NCCLWeightTransferEngine.trainer_send_weights(iterator=iter(named),
                                                         trainer_args=NCCLTrainerSendWeightsArgs(group=self.group,
                                                                                                 packed=True))
            thread.join()
            if failure:
                raise OpdError(f"the rollout server did not take the weights: {failure[0]}")
            if self.bracketed:
                self.post("/finish_weight_update")
        finally:
            self.post("/resume")
