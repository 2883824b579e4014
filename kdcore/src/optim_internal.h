// Optimiser internals: the update kernel over raw arrays, separated from struct kd_optim
// (which needs a struct kd_net) so that the math can be tested against hand-computed
// references without building a network. Nothing here is part of the public API.
#ifndef KD_OPTIM_INTERNAL_H
#define KD_OPTIM_INTERNAL_H

#include "kd_internal.h"

// Validates *cfg and writes it to *out with the defaults filled in (beta1 0.9, beta2
// 0.999, eps 1e-8 where those are 0). KD_ERR_VALUE with kd_last_error() naming the field
// on failure. out may alias cfg.
enum kd_status kd_optim_resolve_cfg_(struct kd_optim_cfg * out, const struct kd_optim_cfg * cfg);

// Whether weight decay applies to parameter tensor t under cfg (ignores the size of
// weight_decay). See the rule in optim.c.
bool kd_optim_decays_(const struct kd_tensor_info * t, const struct kd_optim_cfg * cfg);

// One optimiser update over n elements, in place, torch semantics.
//   cfg    resolved config (kd_optim_resolve_cfg_); cfg->lr is ignored, lr is used
//   p, g   parameters and gradients
//   m      SGD momentum buffer (may be NULL when momentum == 0) / Adam first moment
//   v      Adam second moment (unused for SGD, may be NULL)
//   decay  per-element 0/1 weight-decay mask, or NULL: every element decays
//   step   1-based index of this step: Adam bias corrections use it; for SGD step 1
//          initialises the momentum buffer with the gradient (torch clones it)
// Elementwise and OpenMP static over elements, so the result does not depend on the
// thread count.
void kd_optim_update_(const struct kd_optim_cfg * cfg, float * p, const float * g, float * m,
                      float * v, const uint8_t * decay, size_t n, float lr, int64_t step);

#endif // KD_OPTIM_INTERNAL_H
