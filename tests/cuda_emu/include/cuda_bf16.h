// Stand-in for <cuda_bf16.h>: __nv_bfloat16 is c10::BFloat16 (the same 16 bits; conversions from
// float round to nearest even, as __float2bfloat16_rn does; the project builds its CUDA code with
// the bf16 conversions and operators enabled, as c10::BFloat16 has them).
#pragma once
#include <c10/util/BFloat16.h>

#include "cuda_emu.h"

using __nv_bfloat16 = c10::BFloat16;
inline float __bfloat162float(__nv_bfloat16 v) { return static_cast<float>(v); }
inline __nv_bfloat16 __float2bfloat16_rn(float v) { return c10::BFloat16(v); }
inline __nv_bfloat16 __float2bfloat16(float v) { return c10::BFloat16(v); }
