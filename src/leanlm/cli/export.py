"""`leanlm export`: write a model for transformers (hf), vLLM (compressed-tensors) or llama.cpp (gguf)."""

from __future__ import annotations

from leanlm.cli.options import command, output_options


def add_parser(sub) -> None:
    p = command(sub, "export", "write a model for transformers (hf), vLLM (compressed-tensors) or llama.cpp (gguf)",
                "Export a model, float or quantized by leanlm, for another runtime. hf: plain transformers weights "
                "(quantized layers dequantized). compressed-tensors: vLLM's format, the quantized codes kept. gguf: "
                "one llama.cpp file; leanlm-quantized layers are written from their codes without re-rounding (int8 "
                "-> Q8_0, symmetric int4 -> Q4_0, asymmetric int4 -> Q4_1).", run)
    p.add_argument("model", help="model to export: a leanlm optimize output's model/ directory, a HF directory, "
                                 "a .gguf file or a built-in name")
    p.add_argument("--format", required=True, choices=["hf", "compressed-tensors", "gguf"], help="target format")
    p.add_argument("--gguf-type", default="auto",
                   choices=["auto", "f32", "f16", "q8_0", "q5_0", "q4_0", "q4_1", "q4_k", "q6_k"],
                   help="GGUF type of linear layers; auto keeps leanlm-quantized layers as they are and writes "
                        "float ones as f16; the K-quants need rows that are a multiple of 256, others fall back "
                        "to q5_0 (q4_k) or q8_0 (q6_k) (default: auto)")
    p.add_argument("--imatrix", type=int, default=0, metavar="N",
                   help="weight the K-quants' scale search by an importance matrix (mean squared input activations) "
                        "measured on N x 512 tokens of --imatrix-data (default: 0, none)")
    p.add_argument("--imatrix-data", help="text for the importance matrix (default: the built-in corpus's train split)")
    p.add_argument("--gguf-embeddings", default="q8_0", choices=["f32", "f16", "q8_0", "q4_0", "q4_1"],
                   help="GGUF type of the token embeddings (default: q8_0)")
    output_options(p, what="output directory (a .gguf file for --format gguf)")


def run(args) -> int:
    from leanlm.export import export

    info = export(args.model, args.out, args.format, args.overwrite, args.gguf_type, args.gguf_embeddings,
                  args.imatrix, args.imatrix_data)
    print(f"wrote {info['out']} ({info['format']}): {info['bytes'] / 2**20:.1f} MiB "
          f"({info['bytes'] / max(1, info['source_bytes']):.2f}x the source) in {info['seconds']:.1f} s")
    return 0
