"""Kept so that existing imports work: everything here lives in `dcae.runtime` (import it from there)."""
from dcae.runtime import (  # noqa: F401
    DTYPE_CHOICES, DTYPES, InferenceOptions, bf16_is_native, cpu_isa, decode, encode, hardware_record, precision,
    prepare_model, resolve_device, resolve_dtype, to_input,
)
