"""The numbers the time model takes, each with its source: interconnects, models, reference steps.

Bandwidths are **per direction** (a ring sends and receives at once): NVIDIA's "600 GB/s NVLink" for
an A100 is 300 GB/s each way. They are peak figures, so the model's communication is a lower bound
(NCCL reaches roughly 75-90% of them). Latencies are NCCL's own model parameters
(nccl ``src/graph/tuning.cc``, Simple protocol for the gradient allreduce, LL for CGBN's small ones):
base latency 8.4 us (ring, Simple) / 6.6 us (LL); per hop 3.4 us over NVLink, 5.7 us over PCIe,
6.6 us over the network (Simple), 0.6 / 1.0 us (LL over NVLink / PCIe).

| system | GPUs / node | intra (per GPU, each way) | inter (per node, each way) | source |
| --- | ---: | --- | --- | --- |
| dgx-2 | 16 V100 | NVLink 2 via NVSwitch, 6 x 25 = 150 GB/s | 8 x 100 Gb/s EDR IB = 100 GB/s | DGX-2 datasheet |
| dgx-a100 | 8 A100 | NVLink 3, 12 x 25 = 300 GB/s | 8 x 200 Gb/s HDR IB = 200 GB/s | DGX A100 datasheet |
| dgx-h100 | 8 H100 | NVLink 4, 18 x 25 = 450 GB/s | 8 x 400 Gb/s NDR IB = 400 GB/s | DGX H100 datasheet |
| cpu-vm | 2 ranks | Gloo over loopback TCP: 1 GB/s (Horovod timeline: 0.95), 0.6 ms a hop | none (one VM) | docs/cross_gpu_bn.md, docs/training.md |

cpu-vm, this project's 2-core development VM: a 2-rank Gloo allreduce of 2-4 KB took 0.85-1.66 ms
(docs/cross_gpu_bn.md, "Collective backends"): 1.2 ms = 2 hops of 0.6 ms. CGBN's shared-memory
allreduce of 257 doubles took 14 us (the same page's table). Gloo's bandwidth: Horovod's timeline
of the demo model (benchmarks/ddp_baseline.py's setting, docs/training.md) shows its 13.6 MB fused
gradient allreduce over 2 ranks in 14.3 ms, b / t = 0.95 GB/s (for N = 2 a ring moves b each way).
hvdet's Horovod cycle (hvdet.comm.horovod_env.horovod_defaults): 5 ms on GPU hosts and on CPU hosts
under the MPI controller (horovodrun's default, the demo's), 20 ms over Gloo (``HVDET_HOROVOD``,
``CPU_HOROVOD``).
"""  # noqa: E501 - the cpu-vm row of the table above is longer than a line, and a Markdown table row cannot wrap
from __future__ import annotations

from dataclasses import dataclass

from hvdet.timemodel.model import Horovod, Link, System

GBps = 1e9
US = 1e-6
_NCCL = {"base_latency_s": 8.4 * US, "bn_base_latency_s": 6.6 * US}
NVLINK_HOP_S, PCIE_HOP_S, NET_HOP_S = 3.4 * US, 5.7 * US, 6.6 * US

SYSTEMS = {
    "dgx-2": System("dgx-2", 16, Link(150 * GBps, NVLINK_HOP_S), Link(100 * GBps, NET_HOP_S),
                    bn_hop_latency_s=0.6 * US, source="NVIDIA DGX-2: 16 V100, NVSwitch, 8x EDR IB", **_NCCL),
    "dgx-a100": System("dgx-a100", 8, Link(300 * GBps, NVLINK_HOP_S), Link(200 * GBps, NET_HOP_S),
                       bn_hop_latency_s=0.6 * US, source="NVIDIA DGX A100: 8 A100, NVLink 3, 8x HDR IB", **_NCCL),
    "dgx-h100": System("dgx-h100", 8, Link(450 * GBps, NVLINK_HOP_S), Link(400 * GBps, NET_HOP_S),
                       bn_hop_latency_s=0.6 * US, source="NVIDIA DGX H100: 8 H100, NVLink 4, 8x NDR IB", **_NCCL),
    "cpu-vm": System("cpu-vm", 2, Link(1 * GBps, 0.6e-3), Link(1 * GBps, 0.6e-3), base_latency_s=0.0,
                     bn_base_latency_s=14 * US, bn_hop_latency_s=0.0,
                     source="this project's 2-core VM: Gloo 0.85-1.66 ms per small allreduce, shm 14 us "
                            "(docs/cross_gpu_bn.md); Gloo bandwidth 1 GB/s assumed"),
}
GPU_SYSTEMS = ("dgx-2", "dgx-a100", "dgx-h100")
HVDET_HOROVOD = Horovod(cycle_s=5e-3)  # hvdet.comm.init(): GPU hosts, and CPU hosts with the MPI controller
CPU_HOROVOD = Horovod(cycle_s=5e-3)  # the same on the demo's CPU host (MPI controller); 20 ms under --gloo
HOROVOD_2018 = Horovod(fusion_bytes=64 * 2**20, cycle_s=5e-3)  # defaults before Horovod 0.21 (its #2468)


@dataclass(frozen=True)
class Model:
    """Parameter count (all parameters: gradients allreduced, an upper bound where stages are frozen)
    and the BatchNorm layers Cross-GPU BN would replace."""

    params: int
    bn_layers: int
    source: str


MODELS = {
    "fasterrcnn_resnet50_fpn": Model(41_755_286, 53, "torchvision weights meta num_params; ResNet-50: 53 BN"),
    "maskrcnn_resnet50_fpn": Model(44_401_393, 53, "torchvision weights meta num_params"),
    "fasterrcnn_resnet101_fpn": Model(60_747_414, 104, "torchvision resnet101 (44.55M) - resnet50 (25.56M) "
                                                       "added to fasterrcnn_resnet50_fpn; ResNet-101: 104 BN"),
    "retinanet_resnet50_fpn": Model(34_014_999, 53, "torchvision weights meta num_params"),
    "retinanet_resnext50_32x4d_fpn": Model(37_060_652, 53, "computed: retinanet_resnet50_fpn - ResNet-50 body "
                                                           "(23,454,912 without BN) + ResNeXt-50 body (22,911,680) "
                                                           "+ MLPerf's 264-class head (+3,588,885 over 91)"),
    "fasterrcnn_resnet18_fpn_fast": Model(3_396_530, 15, "benchmarks/results/model_step.json 'fast'; "
                                                         "ResNet-18 stem + layer1-3: 15 BN"),
    "resnet101": Model(44_549_160, 104, "torchvision resnet101 num_params (tf_cnn_benchmarks' is alike)"),
    "inception_v3": Model(23_851_784, 94, "Keras / TF InceptionV3 without aux head"),
    "vgg16": Model(138_357_544, 0, "torchvision vgg16 num_params"),
}

# Per-GPU steps to project when none is measured: 2 images per GPU, fp32, seconds per iteration on 8
# V100 (maskrcnn-benchmark MODEL_ZOO.md, the 1x baselines). They are a V100's steps: on an A100 or H100
# give your own (--step-s or --metrics).
REFERENCE_STEPS = {"fasterrcnn_resnet50_fpn": 0.3530, "maskrcnn_resnet50_fpn": 0.4536,
                   "fasterrcnn_resnet101_fpn": 0.4591}
REFERENCE_SOURCE = "maskrcnn-benchmark MODEL_ZOO.md: 8 V100, 2 images/GPU, fp32 (a V100's step)"
# Images to train on when not given: the 1x schedule, 90,000 iterations at batch 16 (LargeDet 4.1's
# baseline; about 12 COCO epochs), kept constant at every batch size (LargeDet's protocol).
DEFAULT_IMAGES = 90_000 * 16
BN_COLLECTIVES = {"two_pass": 3, "chan": 2, "one_pass": 2}
