"""Moved to leanlm.models.load (save_model: leanlm.models.save; register_module, packed_tensor, parameter_count: leanlm.core.packed) in the 0.2 re-layering; the old name keeps working, with a warning."""

from leanlm.core.moved import moved

__getattr__ = moved(__name__, {**{n: "leanlm.core.packed" for n in ("register_module", "packed_tensor", "parameter_count")},
                        "save_model": "leanlm.models.save",
                        **{n: "leanlm.models.load" for n in ("load_model", "LoadedModel", "resolve_device", "resolve_dtype",
                                                            "estimate_bytes", "check_memory", "DTYPES")}})
