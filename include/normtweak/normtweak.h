// Umbrella header: the whole public C++ API of normtweak.
#pragma once

#include "normtweak/channel_dist_loss.h"
#include "normtweak/config.h"
#include "normtweak/dlpack.h"
#include "normtweak/error.h"
#include "normtweak/gptq.h"
#include "normtweak/hessian.h"
#include "normtweak/log.h"
#include "normtweak/norm.h"
#include "normtweak/norm_tweaker.h"
#include "normtweak/pack.h"
#include "normtweak/quant_spec.h"
#include "normtweak/quantizer.h"
#include "normtweak/rtn.h"
#include "normtweak/smoothquant.h"
#include "normtweak/tensor_view.h"
#include "normtweak/threading.h"
