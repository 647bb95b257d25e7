"""Developer tools, off the runtime path (nothing in the package imports them):

    python -m llama_fast.tools.compile_check   compile every Triton launch configuration for
                                               each GPU architecture without a GPU; registers,
                                               shared memory, spills, tensor-core instructions
    python -m llama_fast.tools.sass_check      disassemble the built CUDA extension: global
                                               access widths, ldmatrix, mma, local memory
"""
