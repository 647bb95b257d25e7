// Stand-in for the CUDA header of the same name when csrc/ is compiled by the CPU emulator
// (tests/cuda_emulator/cuda_emu.h provides everything the sources use).
#pragma once
#include "../cuda_emu.h"
