"""Machine types and model sizes: what a planner design is built from.

Defaults follow the Splitwise paper (Table I) and its simulator: one machine
is a whole DGX box (8 GPUs, tensor parallel 8), its cost per hour and its
provisioned power (TDP; a power-capped H100 box is provisioned at 70%).
Provisioned power, not measured draw, is what a data-centre power budget
is spent on, so iso-power designs compare TDPs.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from pdserve.planner.decode_model import DecodeLimits
from pdserve.planner.errors import SpecError


class MachineType(BaseModel):
    """One kind of machine a pool can be built from."""

    name: str = Field(description="Short name used in designs and reports, e.g. 'a100'.")
    profile_hardware: str = Field(description="The `hardware` value of this machine's rows in the profile CSV.")
    tensor_parallel: int = Field(8, description="Which `tensor_parallel` rows of the profile to use.")
    cost_per_hour: float = Field(description="Cost of one machine per hour (any currency; reports are relative).")
    power_kw: float = Field(description="Provisioned power of one machine, kW.")
    memory_gb: float = Field(description="Accelerator memory of the whole machine, GB (weights + KV).")
    memory_utilization: float = Field(0.9, description="Fraction of memory the engine may use (vLLM's gpu_memory_utilization).")
    memory_bandwidth_gbps: float | None = Field(None, gt=0, description="Peak memory bandwidth of the whole machine, "
                                                "GB/s: no decode step is modelled faster than its bytes over this.")
    peak_tflops: float | None = Field(None, gt=0, description="Peak dense 16-bit TFLOP/s of the whole machine: "
                                      "no decode step is modelled faster than its FLOPs over this.")


class ModelSpec(BaseModel):
    """The served model's memory footprint: weights and KV bytes per token."""

    name: str = Field(description="The `model` value of the model's rows in the profile CSV.")
    weight_gb: float = Field(description="Weights, GB, on one instance (all tensor-parallel ranks together).")
    kv_bytes_per_token: int = Field(description="2 x layers x KV heads x head dim x bytes per element.")
    bytes_per_param: float = Field(2.0, gt=0, description="Bytes per weight (fp16/bf16: 2); FLOPs per token "
                                   "are 2 x parameters.")

    @property
    def flops_per_token(self) -> float:
        return 2.0 * self.weight_gb * 1e9 / self.bytes_per_param

    def kv_tokens(self, machine: MachineType) -> int:
        """How many tokens of KV one instance of this model holds on `machine`."""
        free_gb = machine.memory_gb * machine.memory_utilization - self.weight_gb
        if free_gb <= 0:
            raise SpecError(f"model {self.name} ({self.weight_gb} GB) does not fit on {machine.name}")
        return int(free_gb * 1e9 // self.kv_bytes_per_token)


def decode_limits(model: ModelSpec, machine: MachineType) -> DecodeLimits:
    """What bounds a decode step of `model` on one instance of `machine` (one instance per machine)."""
    return DecodeLimits(weight_bytes=model.weight_gb * 1e9, kv_bytes_per_token=model.kv_bytes_per_token,
                        peak_bandwidth=machine.memory_bandwidth_gbps * 1e9 if machine.memory_bandwidth_gbps else None,
                        flops_per_token=model.flops_per_token,
                        peak_flops=machine.peak_tflops * 1e12 if machine.peak_tflops else None)


# Splitwise paper, Table I: DGX-A100 $17.6/h 6.5 kW; DGX-H100 $38/h 10.2 kW;
# the power-capped H100 runs at 70% of TDP and costs what an H100 costs.
# Peaks from the GPU data sheets, x 8 GPUs: A100-80GB SXM 2,039 GB/s HBM2e and
# 312 dense bf16 TFLOP/s; H100 SXM 3,350 GB/s HBM3 and 989 TFLOP/s. A power cap
# lowers clocks, not the ceiling, so the capped box keeps the H100's peaks as bounds.
DEFAULT_MACHINES: dict[str, MachineType] = {
    m.name: m
    for m in (
        MachineType(name="a100", profile_hardware="a100-80gb", cost_per_hour=17.6, power_kw=6.5, memory_gb=640,
                    memory_bandwidth_gbps=8 * 2039, peak_tflops=8 * 312),
        MachineType(name="h100", profile_hardware="h100-80gb", cost_per_hour=38.0, power_kw=10.2, memory_gb=640,
                    memory_bandwidth_gbps=8 * 3350, peak_tflops=8 * 989),
        MachineType(name="h100cap", profile_hardware="h100-80gb-pcap", cost_per_hour=38.0, power_kw=7.14,
                    memory_gb=640, memory_bandwidth_gbps=8 * 3350, peak_tflops=8 * 989),
    )
}

# Llama-2-70B: 80 layers, 8 KV heads (GQA), head dim 128, fp16 -> 320 KiB/token.
DEFAULT_MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        ModelSpec(name="llama2-70b", weight_gb=140, kv_bytes_per_token=2 * 80 * 8 * 128 * 2),
        # BLOOM-176B: 70 layers, 112 heads (no GQA), head dim 128, fp16.
        ModelSpec(name="bloom-176b", weight_gb=352, kv_bytes_per_token=2 * 70 * 112 * 128 * 2),
    )
}


def parse_machine(spec: str, base: dict[str, MachineType] | None = None) -> MachineType:
    """`name:key=value,...` -> MachineType; unknown names need all fields.

    Examples: `a100` (defaults), `a100:cost_per_hour=12`,
    `cpu:profile_hardware=cpu,cost_per_hour=1,power_kw=0.2,memory_gb=24,tensor_parallel=1`.
    """
    base = DEFAULT_MACHINES if base is None else base
    name, _, rest = spec.partition(":")
    fields: dict[str, object] = dict(base[name].model_dump()) if name in base else {"name": name}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in MachineType.model_fields:
            raise SpecError(f"bad machine field {item!r} in {spec!r}; fields: {sorted(MachineType.model_fields)}")
        fields[key] = value
    try:
        return MachineType(**fields)
    except Exception as exc:  # pydantic's ValidationError, shown as a user error
        raise SpecError(f"machine {spec!r}: {exc}") from None


def resolve_model(name: str, weight_gb: float | None = None, kv_bytes_per_token: int | None = None) -> ModelSpec:
    """The model's memory footprint: known defaults, overridden by what the user gives."""
    if name in DEFAULT_MODELS:
        spec = DEFAULT_MODELS[name]
        updates = {k: v for k, v in (("weight_gb", weight_gb), ("kv_bytes_per_token", kv_bytes_per_token))
                   if v is not None}
        return spec.model_copy(update=updates)
    if weight_gb is None or kv_bytes_per_token is None:
        raise SpecError(f"model {name!r} is not built in ({sorted(DEFAULT_MODELS)}): "
                        "give --weight-gb and --kv-bytes-per-token")
    return ModelSpec(name=name, weight_gb=weight_gb, kv_bytes_per_token=kv_bytes_per_token)
