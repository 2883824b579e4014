// The network container: nodes in topological order, parameters in one block, activations
// planned per input shape, forward/backward with taps.
//
// Memory (each one allocation, grown only when a larger batch needs it, and only allocated
// when a pass actually uses it: an inference-only net never holds acts, dacts or cache):
//   params, grads   every trainable tensor, contiguous (optimisers and checkpoints see one array)
//   buffers         BN running statistics
//   acts            input copy + every node's output for the planned batch (forward that
//                   backward may follow)
//   dacts           gradients of node outputs during backward, liveness-planned (grad_off):
//                   a node's gradient exists from the backward of its last consumer (the
//                   first to add to it) to its own, so only a few layers' worth are ever live
//                   at once; first backward
//   inj             per node, allocated when kd_net_grad_add first reaches it: gradients
//                   added before backward (taps, exit heads, the output), folded into the
//                   node's dacts slot when backward reaches it
//   cache           what backward needs besides activations: BN mean/rstd, maxpool argmax,
//                   dropout masks
//   inf             KD_MODE_NO_GRAD forwards: the kept outputs (output node + kd_net_keep
//                   nodes) for the whole batch, then a liveness-planned scratch for one chunk
//                   of images (a node's buffer is reused once all its consumers ran), then
//                   the chunk's maxpool argmax / BN / dropout scratch
//   work            layer scratch: conv im2col and dweight partials, linear packed panels
// Nodes store offsets into these blocks, not pointers, so re-planning needs no fix-ups.
#include "kd_internal.h"
#include "layers.h"

#include <stdio.h>
#include <unistd.h>

struct kd_node {
    struct kd_layer_spec spec;
    char name[KD_MAX_NAME];
    size_t w_off, b_off;      // into params/grads; SIZE_MAX when absent
    size_t rm_off, rv_off;    // into buffers (BN)
    int64_t bn_batches;
    int jit[3];               // JITTER: the last forward's shifts (dy, dx) and flip
    // plan
    int c, h, w;              // per-sample output shape
    size_t numel;             // N*c*h*w
    size_t act_off;           // into acts (all outputs kept)
    size_t cur_off;           // into acts for the last forward (act_off, or the lean layout)
    int n_consumers;          // nodes reading this output (kd_net_plan)
    bool overwritten;         // the last (lean) forward let its consumer (ReLU/add) overwrite this output
    size_t grad_off;          // into dacts (liveness plan, kd_net_plan)
    size_t cache_off;         // into cache
    bool grad_live;           // dacts slot holds a gradient for the current backward
    bool needs_grad;          // this backward needs the gradient of this output (kd_net_backward)
    bool inj_live;            // inj holds a gradient added since the last forward
    float * inj;              // kd_net_grad_add's gradient (numel floats when live)
    size_t inj_cap;
    bool keep;                // kd_net_keep: output stays readable after a NO_GRAD forward
    // last NO_GRAD forward: kept outputs at inf + inf_off (whole batch); other nodes at
    // scratch + inf_off * chunk (inf_off counted per image)
    bool inf_kept;
    size_t inf_off;
    // KD_LAYER_INPUT: the data kd_net_set_input gave (borrowed), its per-sample shape, and
    // where backward writes its gradient
    const float * ext;
    float * dext;
    int ext_c, ext_h, ext_w;
    bool ext_set;
};

struct kd_net {
    struct kd_node * nodes;
    int n_nodes, cap_nodes;
    int out_node;             // the network output (default: the last node)
    bool finalized;

    struct kd_tensor_info * tensors;
    int n_tensors;
    float * params, * grads;
    size_t n_params;
    float * buffers;
    size_t n_buffers;

    int N, C, H, W;           // planned input shape (N = 0: no plan)
    size_t in_off;            // input copy in acts
    float * acts, * dacts, * cache, * work, * inf;
    size_t acts_cap, dacts_cap, cache_cap, work_cap, inf_cap, acts_used, cache_used, dacts_used;
    int chunk;                // kd_net_set_chunk (0 = automatic)
    int last_chunk;           // images per chunk of the last NO_GRAD forward (0: not one)

    bool forward_done;
    bool infer_done;          // the last forward was KD_MODE_NO_GRAD (no backward possible)
    unsigned forward_mode;    // kd_mode of the last forward (BN and dropout backward depend on it)
    bool ext_changed;         // an extra input's shape changed since the last plan
};

#define NO_OFF SIZE_MAX

// Per-layer facts: the name (messages, Python), how many node inputs it reads, and whether
// its backward reads its own output (then a lean forward never writes over that output).
static const struct layer_info {
    const char * name;
    int n_inputs;
    bool backward_reads_output;
} layer_info[KD_LAYER_COUNT] = {
    [KD_LAYER_LINEAR]         = { "linear",         1, false },
    [KD_LAYER_CONV2D]         = { "conv2d",         1, false },
    [KD_LAYER_BATCHNORM]      = { "batchnorm",      1, false },
    [KD_LAYER_RELU]           = { "relu",           1, true  },
    [KD_LAYER_MAXPOOL2D]      = { "maxpool2d",      1, false },
    [KD_LAYER_AVGPOOL2D]      = { "avgpool2d",      1, false },
    [KD_LAYER_GLOBAL_AVGPOOL] = { "global_avgpool", 1, false },
    [KD_LAYER_DROPOUT]        = { "dropout",        1, false },
    [KD_LAYER_FLATTEN]        = { "flatten",        1, false },
    [KD_LAYER_ADD]            = { "add",            2, false },
    [KD_LAYER_INPUT]          = { "input",          0, false },
    [KD_LAYER_UPSAMPLE]       = { "upsample",       1, false },
    [KD_LAYER_SIGMOID]        = { "sigmoid",        1, true  },
    [KD_LAYER_MUL]            = { "mul",            2, false },
    [KD_LAYER_CONCAT]         = { "concat",         2, false },
    [KD_LAYER_UPSAMPLE_BILINEAR] = { "upsample_bilinear", 1, false },
    [KD_LAYER_LEAKY_RELU]     = { "leaky_relu",     1, false },
    [KD_LAYER_TANH]           = { "tanh",           1, true  },
    [KD_LAYER_RESHAPE]        = { "reshape",        1, false },
    [KD_LAYER_JITTER]         = { "jitter",         1, false },
};

static int n_inputs(const struct kd_layer_spec * s) { return layer_info[s->type].n_inputs; }
#define ALIGN16(n) (((n) + 15) & ~(size_t)15)   // offsets in whole 64-byte lines from the arena start

// ---------------------------------------------------------------------------------------
// Building

struct kd_layer_spec kd_layer_default(enum kd_layer_type type) {
    struct kd_layer_spec s;
    memset(&s, 0, sizeof s);
    s.type = type;
    s.inp[0] = KD_INPUT;
    s.inp[1] = KD_INPUT;
    s.stride = 1;
    s.groups = 1;
    s.bias = true;
    s.affine = true;
    s.eps = 1e-5f;
    s.momentum = 0.1f;
    s.slope = 0.01f;
    s.init = KD_INIT_DEFAULT;
    if (type == KD_LAYER_MAXPOOL2D || type == KD_LAYER_AVGPOOL2D) s.stride = 0;   // = kernel
    return s;
}

const char * kd_layer_type_name(enum kd_layer_type type) {
    return (unsigned)type < KD_LAYER_COUNT ? layer_info[type].name : "unknown";
}

struct kd_net * kd_net_new(void) {
    struct kd_net * net = calloc(1, sizeof *net);
    if (!net) kd_set_error_(KD_ERR_NOMEM, __func__, "cannot allocate a net");
    return net;
}

void kd_net_free(struct kd_net * net) {
    if (!net) return;
    for (int i = 0; i < net->n_nodes; i++) free(net->nodes[i].inj);
    free(net->nodes);
    free(net->tensors);
    free(net->params);
    free(net->grads);
    free(net->buffers);
    free(net->acts);
    free(net->dacts);
    free(net->cache);
    free(net->work);
    free(net->inf);
    free(net);
}

static enum kd_status check_spec(const struct kd_net * net, const struct kd_layer_spec * s) {
    const char * nm = s->name;
    if (!nm || !nm[0]) KD_FAIL(KD_ERR_VALUE, "node %d: name is empty", net->n_nodes);
    if (strlen(nm) >= KD_MAX_NAME) KD_FAIL(KD_ERR_VALUE, "name '%.40s...' is longer than %d bytes", nm, KD_MAX_NAME - 1);
    if (kd_net_find(net, nm) >= 0) KD_FAIL(KD_ERR_VALUE, "name '%s' is used twice", nm);
    if ((unsigned)s->type >= KD_LAYER_COUNT) KD_FAIL(KD_ERR_VALUE, "'%s': unknown layer type %d", nm, (int)s->type);
    for (int k = 0; k < n_inputs(s); k++) {
        if (s->inp[k] < KD_INPUT || s->inp[k] >= net->n_nodes)
            KD_FAIL(KD_ERR_VALUE, "'%s': input %d refers to node %d, but only nodes -1..%d exist before it",
                    nm, k, s->inp[k], net->n_nodes - 1);
    }
    switch (s->type) {
    case KD_LAYER_LINEAR:
        if (s->in_ch < 1 || s->out_ch < 1)
            KD_FAIL(KD_ERR_VALUE, "'%s': in_features (%d) and out_features (%d) must be >= 1", nm, s->in_ch, s->out_ch);
        break;
    case KD_LAYER_CONV2D:
        if (s->in_ch < 1 || s->out_ch < 1)
            KD_FAIL(KD_ERR_VALUE, "'%s': in_channels (%d) and out_channels (%d) must be >= 1", nm, s->in_ch, s->out_ch);
        if (s->kernel < 1 || s->stride < 1 || s->padding < 0)
            KD_FAIL(KD_ERR_VALUE, "'%s': kernel_size (%d) and stride (%d) must be >= 1 and padding (%d) >= 0",
                    nm, s->kernel, s->stride, s->padding);
        if (s->groups < 1 || s->in_ch % s->groups || s->out_ch % s->groups)
            KD_FAIL(KD_ERR_VALUE, "'%s': groups (%d) must divide in_channels (%d) and out_channels (%d)",
                    nm, s->groups, s->in_ch, s->out_ch);
        break;
    case KD_LAYER_BATCHNORM:
        if (s->in_ch < 1) KD_FAIL(KD_ERR_VALUE, "'%s': num_features (%d) must be >= 1", nm, s->in_ch);
        if (!(s->eps > 0) || !isfinite(s->eps)) KD_FAIL(KD_ERR_VALUE, "'%s': eps (%g) must be > 0", nm, s->eps);
        if (!(s->momentum >= 0 && s->momentum <= 1))
            KD_FAIL(KD_ERR_VALUE, "'%s': momentum (%g) must be in [0, 1]", nm, s->momentum);
        break;
    case KD_LAYER_MAXPOOL2D:
    case KD_LAYER_AVGPOOL2D:
        if (s->kernel < 1 || s->stride < 0 || s->padding < 0)
            KD_FAIL(KD_ERR_VALUE, "'%s': kernel_size (%d) must be >= 1, stride (%d) and padding (%d) >= 0",
                    nm, s->kernel, s->stride, s->padding);
        if (2 * s->padding > s->kernel)
            KD_FAIL(KD_ERR_VALUE, "'%s': padding (%d) must be at most half of kernel_size (%d)", nm, s->padding, s->kernel);
        break;
    case KD_LAYER_DROPOUT:
        if (!(s->p >= 0 && s->p < 1)) KD_FAIL(KD_ERR_VALUE, "'%s': dropout p (%g) must be in [0, 1)", nm, s->p);
        break;
    case KD_LAYER_INPUT:
        if (s->in_ch < 1) KD_FAIL(KD_ERR_VALUE, "'%s': an input's channels (%d) must be >= 1", nm, s->in_ch);
        break;
    case KD_LAYER_UPSAMPLE:
    case KD_LAYER_UPSAMPLE_BILINEAR:
        if (s->size[0] < 0 || s->size[1] < 0 || (s->size[0] > 0) != (s->size[1] > 0))
            KD_FAIL(KD_ERR_VALUE, "'%s': size (%d, %d) must be two positive values, or 0 for a scale factor", nm,
                    s->size[0], s->size[1]);
        if (s->size[0] == 0 && s->stride < 1)
            KD_FAIL(KD_ERR_VALUE, "'%s': the scale factor (stride, %d) must be >= 1", nm, s->stride);
        break;
    case KD_LAYER_RESHAPE:
        if (s->out_ch < 1 || s->size[0] < 1 || s->size[1] < 1)
            KD_FAIL(KD_ERR_VALUE, "'%s': the shape (%d, %d, %d) must be positive", nm, s->out_ch, s->size[0], s->size[1]);
        break;
    case KD_LAYER_LEAKY_RELU:
        if (!isfinite(s->slope)) KD_FAIL(KD_ERR_VALUE, "'%s': negative_slope (%g) must be finite", nm, s->slope);
        break;
    case KD_LAYER_JITTER:
        if (s->padding < 0) KD_FAIL(KD_ERR_VALUE, "'%s': the largest shift (padding, %d) must be >= 0", nm, s->padding);
        if (!(s->p >= 0 && s->p <= 1)) KD_FAIL(KD_ERR_VALUE, "'%s': the flip probability p (%g) must be in [0, 1]", nm, s->p);
        break;
    case KD_LAYER_RELU:
    case KD_LAYER_GLOBAL_AVGPOOL:
    case KD_LAYER_FLATTEN:
    case KD_LAYER_ADD:
    case KD_LAYER_TANH:
    case KD_LAYER_SIGMOID:
    case KD_LAYER_MUL:
    case KD_LAYER_CONCAT:
    case KD_LAYER_COUNT:
        break;
    }
    return KD_OK;
}

int kd_net_add(struct kd_net * net, const struct kd_layer_spec * spec) {
    if (!net || !spec) { kd_set_error_(KD_ERR_VALUE, __func__, "net and spec must not be NULL"); return -1; }
    if (net->finalized) { kd_set_error_(KD_ERR_STATE, __func__, "the net is finalized; nodes can no longer be added"); return -1; }
    if (check_spec(net, spec) != KD_OK) return -1;
    if (net->n_nodes == net->cap_nodes) {
        int cap = net->cap_nodes ? 2 * net->cap_nodes : 32;
        struct kd_node * p = realloc(net->nodes, (size_t)cap * sizeof *p);
        if (!p) { kd_set_error_(KD_ERR_NOMEM, __func__, "cannot grow the node list"); return -1; }
        net->nodes = p;
        net->cap_nodes = cap;
    }
    struct kd_node * nd = &net->nodes[net->n_nodes];
    memset(nd, 0, sizeof *nd);
    nd->spec = *spec;
    snprintf(nd->name, sizeof nd->name, "%s", spec->name);
    nd->spec.name = nd->name;   // the caller's string is borrowed only for this call
    for (int k = n_inputs(spec); k < 2; k++) nd->spec.inp[k] = KD_INPUT;
    if ((nd->spec.type == KD_LAYER_MAXPOOL2D || nd->spec.type == KD_LAYER_AVGPOOL2D) && nd->spec.stride == 0)
        nd->spec.stride = nd->spec.kernel;
    nd->w_off = nd->b_off = nd->rm_off = nd->rv_off = NO_OFF;
    net->out_node = net->n_nodes;
    return net->n_nodes++;
}

// Parameter layout of one node: weight shape, whether it has a bias, BN buffers.
static int node_weight_shape(const struct kd_layer_spec * s, int shape[4]) {
    switch (s->type) {
    case KD_LAYER_LINEAR:
        shape[0] = s->out_ch; shape[1] = s->in_ch;
        return 2;
    case KD_LAYER_CONV2D:
        shape[0] = s->out_ch; shape[1] = s->in_ch / s->groups; shape[2] = s->kernel; shape[3] = s->kernel;
        return 4;
    case KD_LAYER_BATCHNORM:
        if (!s->affine) break;
        shape[0] = s->in_ch;
        return 1;
    case KD_LAYER_RELU: case KD_LAYER_MAXPOOL2D: case KD_LAYER_AVGPOOL2D: case KD_LAYER_GLOBAL_AVGPOOL:
    case KD_LAYER_DROPOUT: case KD_LAYER_FLATTEN: case KD_LAYER_ADD: case KD_LAYER_INPUT: case KD_LAYER_UPSAMPLE:
    case KD_LAYER_SIGMOID: case KD_LAYER_MUL: case KD_LAYER_CONCAT: case KD_LAYER_UPSAMPLE_BILINEAR:
    case KD_LAYER_LEAKY_RELU: case KD_LAYER_TANH: case KD_LAYER_RESHAPE: case KD_LAYER_JITTER: case KD_LAYER_COUNT:
        break;
    }
    return 0;
}

static bool node_has_bias(const struct kd_layer_spec * s) {
    return (s->type == KD_LAYER_BATCHNORM && s->affine) ||
           ((s->type == KD_LAYER_LINEAR || s->type == KD_LAYER_CONV2D) && s->bias);
}

static void add_tensor(struct kd_net * net, const char * node, const char * what, int ndim,
                       const int * shape, size_t offset, bool is_buffer) {
    struct kd_tensor_info * t = &net->tensors[net->n_tensors++];
    memset(t, 0, sizeof *t);
    snprintf(t->name, sizeof t->name, "%s.%s", node, what);
    t->ndim = ndim;
    t->numel = 1;
    for (int i = 0; i < ndim; i++) { t->shape[i] = shape[i]; t->numel *= (size_t)shape[i]; }
    t->offset = offset;
    t->is_buffer = is_buffer;
    t->decay = !is_buffer;
}

enum kd_status kd_net_finalize(struct kd_net * net, uint64_t seed) {
    if (!net) KD_FAIL(KD_ERR_VALUE, "net is NULL");
    if (net->finalized) KD_FAIL(KD_ERR_STATE, "the net is already finalized");
    if (net->n_nodes == 0) KD_FAIL(KD_ERR_STATE, "the net has no nodes");
    // Sizes first (overflow-checked), then one allocation per block.
    size_t np = 0, nb = 0;
    int nt = 0;
    for (int i = 0; i < net->n_nodes; i++) {
        struct kd_node * nd = &net->nodes[i];
        if (nd->spec.type == KD_LAYER_BATCHNORM) {   // running statistics, affine or not
            nd->rm_off = nb; nd->rv_off = nb + (size_t)nd->spec.in_ch;
            nb += 2 * (size_t)nd->spec.in_ch;
            nt += 2;
        }
        int shape[4];
        int ndim = node_weight_shape(&nd->spec, shape);
        if (ndim == 0) continue;
        size_t numel = 1;
        for (int k = 0; k < ndim; k++)
            if (!kd_mul_ok(numel, (size_t)shape[k], &numel)) KD_FAIL(KD_ERR_VALUE, "'%s': weight too large", nd->name);
        nd->w_off = np;
        np += numel;
        nt++;
        if (node_has_bias(&nd->spec)) { nd->b_off = np; np += (size_t)shape[0]; nt++; }
    }
    net->tensors = calloc((size_t)nt + 1, sizeof *net->tensors);
    net->params = calloc(np + 1, sizeof(float));
    net->grads = calloc(np + 1, sizeof(float));
    net->buffers = calloc(nb + 1, sizeof(float));
    if (!net->tensors || !net->params || !net->grads || !net->buffers) {
        free(net->tensors); free(net->params); free(net->grads); free(net->buffers);
        net->tensors = NULL; net->params = net->grads = net->buffers = NULL;
        KD_FAIL(KD_ERR_NOMEM, "cannot allocate %zu parameters", np);
    }
    net->n_params = np;
    net->n_buffers = nb;
    // Tensor table: all parameters first (in node order), then all buffers.
    for (int i = 0; i < net->n_nodes; i++) {
        struct kd_node * nd = &net->nodes[i];
        int shape[4];
        int ndim = node_weight_shape(&nd->spec, shape);
        if (ndim == 0) continue;
        add_tensor(net, nd->name, "weight", ndim, shape, nd->w_off, false);
        if (nd->b_off != NO_OFF) add_tensor(net, nd->name, "bias", 1, shape, nd->b_off, false);
    }
    for (int i = 0; i < net->n_nodes; i++) {
        struct kd_node * nd = &net->nodes[i];
        if (nd->spec.type != KD_LAYER_BATCHNORM) continue;
        int shape[1] = { nd->spec.in_ch };
        add_tensor(net, nd->name, "running_mean", 1, shape, nd->rm_off, true);
        add_tensor(net, nd->name, "running_var", 1, shape, nd->rv_off, true);
    }
    net->finalized = true;
    kd_net_init_params(net, seed);
    return KD_OK;
}

void kd_net_init_params(struct kd_net * net, uint64_t seed) {
    if (!net || !net->finalized) return;
    for (int i = 0; i < net->n_nodes; i++) {
        struct kd_node * nd = &net->nodes[i];
        const struct kd_layer_spec * s = &nd->spec;
        uint64_t ns = kd_hash(seed, (uint64_t)i);   // per-node stream: adding a node elsewhere
                                                     // does not reshuffle every other layer
        float * w = nd->w_off != NO_OFF ? net->params + nd->w_off : NULL;
        float * b = nd->b_off != NO_OFF ? net->params + nd->b_off : NULL;
        if (s->type == KD_LAYER_BATCHNORM) {
            for (int c = 0; c < s->in_ch; c++) {
                if (w) { w[c] = 1.0f; b[c] = 0.0f; }
                net->buffers[nd->rm_off + c] = 0.0f;
                net->buffers[nd->rv_off + c] = 1.0f;
            }
            nd->bn_batches = 0;
            continue;
        }
        int shape[4];
        int ndim = node_weight_shape(s, shape);
        if (ndim == 0) continue;
        size_t numel = 1;
        for (int k = 0; k < ndim; k++) numel *= (size_t)shape[k];
        size_t receptive = s->type == KD_LAYER_CONV2D ? (size_t)s->kernel * s->kernel : 1;
        double fan_in = (double)shape[1] * receptive;
        double fan_out = (double)shape[0] * receptive;
        switch (s->init) {
        case KD_INIT_KAIMING_OUT:
        case KD_INIT_KAIMING_IN: {
            double sd = sqrt(2.0 / (s->init == KD_INIT_KAIMING_OUT ? fan_out : fan_in));
            for (size_t j = 0; j < numel; j++) w[j] = (float)(sd * kd_normal(ns, j));
            if (b) for (int c = 0; c < shape[0]; c++) b[c] = 0.0f;
            break;
        }
        case KD_INIT_DEFAULT:
        default: {
            // kaiming_uniform_(a=sqrt(5)) reduces to U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
            float bound = (float)(1.0 / sqrt(fan_in));
            for (size_t j = 0; j < numel; j++) w[j] = bound * (2.0f * kd_uniform(kd_hash(ns, j)) - 1.0f);
            if (b) for (int c = 0; c < shape[0]; c++)
                b[c] = bound * (2.0f * kd_uniform(kd_hash(ns ^ 0xB1A5ull, (uint64_t)c)) - 1.0f);
            break;
        }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Accessors

enum kd_status kd_net_set_output(struct kd_net * net, int node) {
    if (!net) KD_FAIL(KD_ERR_VALUE, "net is NULL");
    if (node < 0 || node >= net->n_nodes) KD_FAIL(KD_ERR_VALUE, "node %d does not exist (the net has %d)", node, net->n_nodes);
    net->out_node = node;
    return KD_OK;
}

int kd_net_output_node(const struct kd_net * net) { return net ? net->out_node : -1; }

int kd_net_num_nodes(const struct kd_net * net) { return net ? net->n_nodes : 0; }

int kd_net_find(const struct kd_net * net, const char * name) {
    if (!net || !name) return -1;
    for (int i = 0; i < net->n_nodes; i++)
        if (strcmp(net->nodes[i].name, name) == 0) return i;
    return -1;
}

const struct kd_layer_spec * kd_net_node_spec(const struct kd_net * net, int node) {
    if (!net || node < 0 || node >= net->n_nodes) return NULL;
    return &net->nodes[node].spec;
}

int kd_net_num_tensors(const struct kd_net * net) { return net ? net->n_tensors : 0; }
const struct kd_tensor_info * kd_net_tensor(const struct kd_net * net, int i) {
    if (!net || i < 0 || i >= net->n_tensors) return NULL;
    return &net->tensors[i];
}
size_t  kd_net_num_params(const struct kd_net * net) { return net ? net->n_params : 0; }
float * kd_net_params(struct kd_net * net) { return net ? net->params : NULL; }
float * kd_net_grads(struct kd_net * net) { return net ? net->grads : NULL; }
size_t  kd_net_num_buffers(const struct kd_net * net) { return net ? net->n_buffers : 0; }
float * kd_net_buffers(struct kd_net * net) { return net ? net->buffers : NULL; }
int64_t * kd_net_bn_batches(struct kd_net * net, int node) {
    if (!net || node < 0 || node >= net->n_nodes || net->nodes[node].spec.type != KD_LAYER_BATCHNORM) return NULL;
    return &net->nodes[node].bn_batches;
}
int kd_net_batch(const struct kd_net * net) { return net ? net->N : 0; }

bool kd_net_bn_running_(struct kd_net * net, int node, const float ** rmean, const float ** rvar) {
    if (!net || !net->finalized || node < 0 || node >= net->n_nodes || net->nodes[node].spec.type != KD_LAYER_BATCHNORM)
        return false;
    *rmean = net->buffers + net->nodes[node].rm_off;
    *rvar = net->buffers + net->nodes[node].rv_off;
    return true;
}

void kd_net_input_shape(const struct kd_net * net, int * C, int * H, int * W) {
    bool ok = net && net->N > 0;
    *C = ok ? net->C : 0; *H = ok ? net->H : 0; *W = ok ? net->W : 0;
}

void kd_net_node_shape(const struct kd_net * net, int node, int * C, int * H, int * W) {
    if (!net || net->N == 0) { *C = *H = *W = 0; return; }
    if (node < 0) node = net->out_node;
    if (node >= net->n_nodes) { *C = *H = *W = 0; return; }
    *C = net->nodes[node].c; *H = net->nodes[node].h; *W = net->nodes[node].w;
}

void kd_net_zero_grad(struct kd_net * net) {
    if (net && net->grads) memset(net->grads, 0, net->n_params * sizeof(float));
}

// ---------------------------------------------------------------------------------------
// Planning: per-node output shapes and arena offsets for an input of (N, C, H, W).

static void in_shape(const struct kd_net * net, int inp, int * c, int * h, int * w) {
    if (inp == KD_INPUT) { *c = net->C; *h = net->H; *w = net->W; }
    else { *c = net->nodes[inp].c; *h = net->nodes[inp].h; *w = net->nodes[inp].w; }
}

static enum kd_status grow(float ** p, size_t * cap, size_t need, const char * what) {
    if (need <= *cap && *p) return KD_OK;
    float * q = malloc((need ? need : 1) * sizeof(float));
    if (!q) KD_FAIL(KD_ERR_NOMEM, "cannot allocate %zu MB for %s", need * sizeof(float) >> 20, what);
    free(*p);
    *p = q;
    *cap = need;
    return KD_OK;
}

// Gradient slots for backward (after the activation plan set numel). Backward visits nodes
// from last to first; node k's gradient is first written by its last consumer (largest
// index j reading k) and last read by k's own backward, so it lives over the index range
// [k, last consumer]. Two nodes whose ranges overlap get disjoint slots -- in particular a
// layer's own gradient and its inputs' (both live at its step). First fit, placing nodes in
// the order backward reaches them. Returns the floats the arena needs.
static size_t plan_gradients(struct kd_net * net) {
    const int nn = net->n_nodes;
    int * end = malloc((size_t)(nn ? nn : 1) * sizeof *end);
    int * placed = malloc((size_t)(nn ? nn : 1) * sizeof *placed);
    if (!end || !placed) {   // no plan: one slot per node (the layout of acts, always valid)
        free(end); free(placed);
        size_t off = 0;
        for (int i = 0; i < nn; i++) { net->nodes[i].grad_off = off; off += ALIGN16(net->nodes[i].numel); }
        return off;
    }
    for (int i = 0; i < nn; i++) end[i] = i;
    for (int i = 0; i < nn; i++) {
        const struct kd_layer_spec * s = &net->nodes[i].spec;
        for (int k = 0; k < n_inputs(s); k++)
            if (s->inp[k] != KD_INPUT && end[s->inp[k]] < i) end[s->inp[k]] = i;
    }
    size_t peak = 0;
    int n_placed = 0;
    for (int t = nn - 1; t >= 0; t--) {           // backward step t: nodes whose gradient starts here
        for (int k = t; k >= 0; k--) {
            if (end[k] != t) continue;
            // lowest offset clear of every placed node whose range overlaps [k, end[k]]
            size_t sz = ALIGN16(net->nodes[k].numel), off = 0;
            bool moved = true;
            while (moved) {
                moved = false;
                for (int j = 0; j < n_placed; j++) {
                    const int o = placed[j];
                    if (o > end[k] || end[o] < k) continue;   // disjoint in time
                    const size_t lo = net->nodes[o].grad_off, hi = lo + ALIGN16(net->nodes[o].numel);
                    if (off < hi && lo < off + sz) { off = hi; moved = true; }
                }
            }
            net->nodes[k].grad_off = off;
            if (off + sz > peak) peak = off + sz;
            placed[n_placed++] = k;
        }
    }
    free(end); free(placed);
    return peak;
}

enum kd_status kd_net_plan(struct kd_net * net, int N, int C, int H, int W) {
    if (!net) KD_FAIL(KD_ERR_VALUE, "net is NULL");
    if (!net->finalized) KD_FAIL(KD_ERR_STATE, "the net is not finalized");
    if (N < 1 || C < 1 || H < 1 || W < 1) KD_FAIL(KD_ERR_SHAPE, "input shape (%d, %d, %d, %d) has an empty dimension", N, C, H, W);
    if (net->N == N && net->C == C && net->H == H && net->W == W && !net->ext_changed) return KD_OK;
    net->N = 0;   // invalid until this plan succeeds
    net->forward_done = false;
    int sC = net->C, sH = net->H, sW = net->W;
    net->C = C; net->H = H; net->W = W;
    size_t acts = 0, cache = 0, per;
    if (!kd_mul_ok((size_t)N, (size_t)C * H * W, &per)) goto too_big;
    net->in_off = 0;
    acts = per;
    for (int i = 0; i < net->n_nodes; i++) {
        struct kd_node * nd = &net->nodes[i];
        const struct kd_layer_spec * s = &nd->spec;
        int c, h, w;
        in_shape(net, s->inp[0], &c, &h, &w);
        int oc = c, oh = h, ow = w;
        switch (s->type) {
        case KD_LAYER_LINEAR:
            if (h != 1 || w != 1) {
                net->C = sC; net->H = sH; net->W = sW;
                KD_FAIL(KD_ERR_SHAPE, "linear '%s' needs flat input features, got (%d, %d, %d): add a Flatten before it",
                        nd->name, c, h, w);
            }
            if (c != s->in_ch) {
                net->C = sC; net->H = sH; net->W = sW;
                KD_FAIL(KD_ERR_SHAPE, "linear '%s' expects %d input features, got %d", nd->name, s->in_ch, c);
            }
            oc = s->out_ch;
            break;
        case KD_LAYER_CONV2D:
        case KD_LAYER_MAXPOOL2D:
        case KD_LAYER_AVGPOOL2D:
            if (s->type == KD_LAYER_CONV2D && c != s->in_ch) {
                net->C = sC; net->H = sH; net->W = sW;
                // At the network input, name the layout: flat (N, features) data reaches a conv as
                // (N, features, 1, 1), and "got 784 channels" alone does not say why.
                if (s->inp[0] == KD_INPUT)
                    KD_FAIL(KD_ERR_SHAPE, "conv2d '%s' expects %d input channels, got %d: the network input must be "
                            "images (N, %d, H, W), got (N, %d, %d, %d)%s", nd->name, s->in_ch, c, s->in_ch, c, h, w,
                            h == 1 && w == 1 ? " (flat features? reshape them to images)" : "");
                KD_FAIL(KD_ERR_SHAPE, "conv2d '%s' expects %d input channels, got %d", nd->name, s->in_ch, c);
            }
            if (h + 2 * s->padding < s->kernel || w + 2 * s->padding < s->kernel) {
                net->C = sC; net->H = sH; net->W = sW;
                KD_FAIL(KD_ERR_SHAPE, "%s '%s': input %dx%d (padding %d) is smaller than kernel %d",
                        kd_layer_type_name(s->type), nd->name, h, w, s->padding, s->kernel);
            }
            oh = (h + 2 * s->padding - s->kernel) / s->stride + 1;
            ow = (w + 2 * s->padding - s->kernel) / s->stride + 1;
            if (s->type == KD_LAYER_CONV2D) oc = s->out_ch;
            break;
        case KD_LAYER_BATCHNORM:
            if (c != s->in_ch) {
                net->C = sC; net->H = sH; net->W = sW;
                KD_FAIL(KD_ERR_SHAPE, "batchnorm '%s' expects %d channels, got %d", nd->name, s->in_ch, c);
            }
            break;
        case KD_LAYER_GLOBAL_AVGPOOL:
            oh = ow = 1;
            break;
        case KD_LAYER_FLATTEN:
            oc = c * h * w; oh = ow = 1;
            break;
        case KD_LAYER_ADD:
        case KD_LAYER_MUL:
        case KD_LAYER_CONCAT: {
            int c2, h2, w2;
            in_shape(net, s->inp[1], &c2, &h2, &w2);
            const bool ok = s->type == KD_LAYER_ADD ? c == c2 && h == h2 && w == w2
                          : s->type == KD_LAYER_MUL ? (c2 == c || c2 == 1) && h == h2 && w == w2
                          : h == h2 && w == w2;
            if (!ok) {
                net->C = sC; net->H = sH; net->W = sW;
                KD_FAIL(KD_ERR_SHAPE, "%s '%s': inputs have shapes (%d, %d, %d) and (%d, %d, %d)%s", layer_info[s->type].name,
                        nd->name, c, h, w, c2, h2, w2,
                        s->type == KD_LAYER_MUL ? " (the second must match, or have one channel)" :
                        s->type == KD_LAYER_CONCAT ? " (their sizes must match)" : "");
            }
            if (s->type == KD_LAYER_CONCAT) oc = c + c2;
            break;
        }
        case KD_LAYER_RESHAPE:
            if ((size_t)c * h * w != (size_t)s->out_ch * s->size[0] * s->size[1]) {
                net->C = sC; net->H = sH; net->W = sW;
                KD_FAIL(KD_ERR_SHAPE, "reshape '%s': %d values per sample cannot become (%d, %d, %d)", nd->name,
                        c * h * w, s->out_ch, s->size[0], s->size[1]);
            }
            oc = s->out_ch; oh = s->size[0]; ow = s->size[1];
            break;
        case KD_LAYER_INPUT:
            if (!nd->ext_set || nd->ext_c != s->in_ch) {
                net->C = sC; net->H = sH; net->W = sW;
                if (!nd->ext_set) KD_FAIL(KD_ERR_STATE, "input '%s' has no data: give it with kd_net_set_input", nd->name);
                KD_FAIL(KD_ERR_SHAPE, "input '%s' expects %d channels, got %d", nd->name, s->in_ch, nd->ext_c);
            }
            oc = nd->ext_c; oh = nd->ext_h; ow = nd->ext_w;
            break;
        case KD_LAYER_UPSAMPLE:
        case KD_LAYER_UPSAMPLE_BILINEAR:
            if (s->size[0] > 0) { oh = s->size[0]; ow = s->size[1]; }
            else if (h > INT32_MAX / s->stride || w > INT32_MAX / s->stride) goto too_big;
            else { oh = h * s->stride; ow = w * s->stride; }
            break;
        case KD_LAYER_RELU:
        case KD_LAYER_DROPOUT:
        case KD_LAYER_SIGMOID:
        case KD_LAYER_LEAKY_RELU:
        case KD_LAYER_TANH:
        case KD_LAYER_JITTER:
        case KD_LAYER_COUNT:
            break;
        }
        nd->c = oc; nd->h = oh; nd->w = ow;
        if (!kd_mul_ok((size_t)N, (size_t)oc * oh * ow, &nd->numel)) goto too_big;
        nd->act_off = acts;
        acts += nd->numel;
        nd->cache_off = cache;
        if (s->type == KD_LAYER_BATCHNORM) cache += 2 * (size_t)oc;
        else if (s->type == KD_LAYER_MAXPOOL2D || s->type == KD_LAYER_DROPOUT) cache += nd->numel;
        if (acts > SIZE_MAX / 8 || cache > SIZE_MAX / 8) goto too_big;
    }
    for (int i = 0; i < net->n_nodes; i++) { net->nodes[i].n_consumers = 0; net->nodes[i].cur_off = net->nodes[i].act_off; }
    for (int i = 0; i < net->n_nodes; i++) {
        const struct kd_layer_spec * s = &net->nodes[i].spec;
        for (int k = 0; k < n_inputs(s); k++)
            if (s->inp[k] != KD_INPUT) net->nodes[s->inp[k]].n_consumers++;
    }
    net->dacts_used = plan_gradients(net);
    // Nothing is allocated here: a forward allocates what its mode needs (acts and cache, or
    // the inference arena), the first backward the gradients.
    net->acts_used = acts;
    net->cache_used = cache;
    net->N = N;
    net->ext_changed = false;
    return KD_OK;
too_big:
    net->C = sC; net->H = sH; net->W = sW;
    KD_FAIL(KD_ERR_SHAPE, "activations for input (%d, %d, %d, %d) would overflow memory sizes", N, C, H, W);
}

// Conv shape for a batch of N images (net->N, or a chunk of it).
static struct kd_conv_shape conv_shape(const struct kd_net * net, const struct kd_node * nd, int N) {
    int c, h, w;
    in_shape(net, nd->spec.inp[0], &c, &h, &w);
    struct kd_conv_shape s = { N, c, h, w, nd->c, nd->h, nd->w,
                               nd->spec.kernel, nd->spec.stride, nd->spec.padding, nd->spec.groups };
    return s;
}

// Layer scratch (conv: depends on the thread count at call time (kd_set_num_threads may change it).
static enum kd_status ensure_work(struct kd_net * net, int N) {
    int nt = kd_omp_threads();
    size_t need = 0;
    for (int i = 0; i < net->n_nodes; i++) {
        const struct kd_node * nd = &net->nodes[i];
        size_t k = 0;
        if (nd->spec.type == KD_LAYER_CONV2D) {
            struct kd_conv_shape s = conv_shape(net, nd, N);
            k = kd_conv2d_workspace(&s, nt);
        } else if (nd->spec.type == KD_LAYER_LINEAR) {
            int c, h, w;
            in_shape(net, nd->spec.inp[0], &c, &h, &w);
            k = kd_linear_workspace(N, c, nd->c);
        }
        if (k > need) need = k;
    }
    return grow(&net->work, &net->work_cap, need, "layer scratch");
}

// ---------------------------------------------------------------------------------------
// Forward

static const float * act_of(const struct kd_net * net, int node) {
    return net->acts + (node == KD_INPUT ? net->in_off : net->nodes[node].cur_off);
}

static size_t per_image(const struct kd_node * nd) { return (size_t)nd->c * nd->h * nd->w; }

// One node's forward over N images (the whole batch, or a chunk of it in a NO_GRAD forward):
// out/in/in2 point at the first image; cache holds what the layer saves (BN mean/rstd for
// C channels, maxpool argmax and dropout masks for the N images).
static void node_forward(struct kd_net * net, int i, int N, float * out, const float * in, const float * in2,
                         float * cache, float * work, unsigned mode, uint64_t dropout_seed) {
    struct kd_node * nd = &net->nodes[i];
    const struct kd_layer_spec * s = &nd->spec;
    int c, h, w;
    in_shape(net, s->inp[0], &c, &h, &w);
    const size_t numel = (size_t)N * per_image(nd);
    const float * wt = nd->w_off != NO_OFF ? net->params + nd->w_off : NULL;
    const float * bs = nd->b_off != NO_OFF ? net->params + nd->b_off : NULL;
    switch (s->type) {
    case KD_LAYER_LINEAR:
        kd_linear_forward(out, in, wt, bs, N, c, nd->c, work);
        break;
    case KD_LAYER_CONV2D: {
        struct kd_conv_shape cs = conv_shape(net, nd, N);
        kd_conv2d_forward(out, in, wt, bs, &cs, work);
        break;
    }
    case KD_LAYER_BATCHNORM:
        if (mode & KD_MODE_BN_BATCH) {
            kd_batchnorm_forward_train(out, cache, cache + c, net->buffers + nd->rm_off,
                                       net->buffers + nd->rv_off, in, wt, bs, N, c, h * w,
                                       s->eps, s->momentum);
            nd->bn_batches++;
        } else {
            kd_batchnorm_forward_eval(out, cache, cache + c, in, wt, bs, net->buffers + nd->rm_off,
                                      net->buffers + nd->rv_off, N, c, h * w, s->eps);
        }
        break;
    case KD_LAYER_RELU:
        kd_relu_forward(out, in, numel);
        break;
    case KD_LAYER_MAXPOOL2D:
        kd_maxpool2d_forward(out, (int32_t *)cache, in, N, c, h, w, nd->h, nd->w, s->kernel, s->stride, s->padding);
        break;
    case KD_LAYER_AVGPOOL2D:
        kd_avgpool2d_forward(out, in, N, c, h, w, nd->h, nd->w, s->kernel, s->stride, s->padding);
        break;
    case KD_LAYER_GLOBAL_AVGPOOL:
        kd_gap_forward(out, in, N, c, h * w);
        break;
    case KD_LAYER_DROPOUT:
        if ((mode & KD_MODE_DROPOUT) && s->p > 0) kd_dropout_forward(out, cache, in, numel, s->p, kd_hash(dropout_seed, (uint64_t)i));
        else memcpy(out, in, numel * sizeof(float));
        break;
    case KD_LAYER_FLATTEN:
    case KD_LAYER_RESHAPE:
        memcpy(out, in, numel * sizeof(float));
        break;
    case KD_LAYER_ADD:
        kd_add_forward(out, in, in2, numel);
        break;
    case KD_LAYER_INPUT:   // `in` is the extra input's data
        memcpy(out, in, numel * sizeof(float));
        break;
    case KD_LAYER_UPSAMPLE:
        kd_nearest_forward(out, in, N, c, h, w, nd->h, nd->w);
        break;
    case KD_LAYER_SIGMOID:
        kd_sigmoid_forward(out, in, numel);
        break;
    case KD_LAYER_UPSAMPLE_BILINEAR:
        kd_bilinear_forward(out, in, N, c, h, w, nd->h, nd->w);
        break;
    case KD_LAYER_LEAKY_RELU:
        kd_leaky_relu_forward(out, in, numel, s->slope);
        break;
    case KD_LAYER_TANH:
        kd_tanh_forward(out, in, numel);
        break;
    case KD_LAYER_JITTER: {
        // One draw for the batch, kept for the backward; eval forwards are the identity.
        struct kd_node * jn = &net->nodes[i];
        jn->jit[0] = jn->jit[1] = jn->jit[2] = 0;
        if (mode & KD_MODE_DROPOUT) {
            const uint64_t r = kd_hash(dropout_seed, (uint64_t)i), span = 2 * (uint64_t)s->padding + 1;
            jn->jit[0] = (int)(kd_hash(r, 0) % span) - s->padding;
            jn->jit[1] = (int)(kd_hash(r, 1) % span) - s->padding;
            jn->jit[2] = s->p > 0 && kd_uniform(kd_hash(r, 2)) < s->p;
        }
        kd_jitter_forward(out, in, N, c, h, w, jn->jit[0], jn->jit[1], jn->jit[2] != 0);
        break;
    }
    case KD_LAYER_MUL: {
        int c2, h2, w2;
        in_shape(net, s->inp[1], &c2, &h2, &w2);
        kd_mul_forward(out, in, in2, N, c, c2, h * w);
        break;
    }
    case KD_LAYER_CONCAT: {
        int c2, h2, w2;
        in_shape(net, s->inp[1], &c2, &h2, &w2);
        kd_concat_forward(out, in, in2, N, c, c2, h * w);
        break;
    }
    case KD_LAYER_COUNT:
        break;
    }
}

// Floats of layer scratch (cache) a node needs for N images: BN mean/rstd (per channel),
// maxpool argmax and dropout masks (per output element).
static void cache_need(const struct kd_node * nd, size_t * fixed, size_t * per_img) {
    *fixed = nd->spec.type == KD_LAYER_BATCHNORM ? 2 * (size_t)nd->c : 0;
    *per_img = nd->spec.type == KD_LAYER_MAXPOOL2D || nd->spec.type == KD_LAYER_DROPOUT ? per_image(nd) : 0;
}

// Images per chunk when kd_net_set_chunk left it automatic. A chunk's working set is
// per-image scratch peak x images: aim at the L2 caches of the threads in use, but never
// below 64 images (each conv call re-packs its weights, and packing must stay a small cost
// next to the chunk's arithmetic: for resnet8x4's 256-channel layer, 64 images amortise the
// 2.4 MB of weights to ~2% of the work) nor above 128 (batch 128 is where the kernels were
// tuned and already run at full speed; larger chunks only cost memory). In deterministic
// mode the budget is one thread's L2 whatever the thread count: linear layers' sums depend
// on the rows of a product, so the chunk size must not follow the threads.
// Nets without convolutions are different: their working set is the weights, not the
// activations, and a linear layer's sgemm gets faster with more rows (measured, mlp
// 784-1200-1200-10 inference at batch 1000, 2 threads: chunks of 125 ran at 37k img/s, one
// chunk of 1000 at 46k), so they run in chunks of up to KD_LINEAR_CHUNK_BYTES of activations
// -- bounded memory, and one chunk for any ordinary batch.
#define KD_LINEAR_CHUNK_BYTES ((size_t)64 << 20)
static int auto_chunk(size_t peak_per_image_floats, bool has_conv) {
    size_t f = peak_per_image_floats * sizeof(float);
    if (!has_conv) {
        size_t b = f ? KD_LINEAR_CHUNK_BYTES / f : INT32_MAX;
        return b < 128 ? 128 : b > INT32_MAX ? INT32_MAX : (int)b;
    }
    long l2 = 0;
#ifdef _SC_LEVEL2_CACHE_SIZE
    l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    if (l2 <= 0) l2 = 1L << 20;   // not reported (some VMs): assume 1 MB per core
    size_t budget = (size_t)l2 * (size_t)(kd_get_deterministic() ? 1 : kd_omp_threads());
    size_t b = f ? budget / f : 128;
    return b < 64 ? 64 : b > 128 ? 128 : (int)b;
}

// KD_MODE_NO_GRAD: lays out the inference arena for net->N images and runs the batch in
// chunks. Each chunk goes through the whole net before the next starts, so only one chunk's
// activations exist at a time; kept outputs are written straight into their whole-batch
// slots (NCHW: the images of a chunk are one contiguous slice). Every kernel treats images
// independently in eval mode (BN with running statistics, convolutions one image per thread
// with a fixed fma order), so the results are the same bits as one whole-batch pass. Batch
// statistics and dropout masks depend on the whole batch (masks are drawn by element index),
// so with KD_MODE_BN_BATCH or KD_MODE_DROPOUT the batch is one chunk.
static enum kd_status forward_infer(struct kd_net * net, const float * x, unsigned mode, uint64_t dropout_seed) {
    const int N = net->N, nn = net->n_nodes;
    int * last = malloc((size_t)nn * sizeof *last);
    bool * need = malloc((size_t)nn * sizeof *need);
    int * live = malloc((size_t)nn * sizeof *live);
    if (!last || !need || !live) { free(last); free(need); free(live); KD_FAIL(KD_ERR_NOMEM, "cannot plan an inference pass"); }
    // Which nodes matter: the kept ones and what they read (exit heads nobody keeps are
    // skipped). With batch statistics every BN must run, since it updates running stats.
    for (int i = 0; i < nn; i++) {
        net->nodes[i].inf_kept = i == net->out_node || net->nodes[i].keep;
        need[i] = net->nodes[i].inf_kept || (mode & KD_MODE_BN_BATCH);
        last[i] = i;
    }
    for (int i = nn - 1; i >= 0; i--) {
        if (!need[i]) continue;
        const struct kd_layer_spec * s = &net->nodes[i].spec;
        for (int k = 0; k < n_inputs(s); k++)
            if (s->inp[k] != KD_INPUT) need[s->inp[k]] = true;
    }
    for (int i = 0; i < nn; i++) {
        if (!need[i]) continue;
        const struct kd_layer_spec * s = &net->nodes[i].spec;
        for (int k = 0; k < n_inputs(s); k++)
            if (s->inp[k] != KD_INPUT && last[s->inp[k]] < i) last[s->inp[k]] = i;
    }
    // Per-image first-fit layout of the scratch: node i may take any range not held by a
    // node k < i that is still to be read (last[k] >= i, its own inputs included).
    size_t kept_total = 0, peak = 0, cfix = 0, cimg = 0;
    int n_live = 0;
    for (int i = 0; i < nn; i++) {
        struct kd_node * nd = &net->nodes[i];
        if (!need[i]) continue;
        size_t f, p;
        cache_need(nd, &f, &p);
        if (f > cfix) cfix = f;
        if (p > cimg) cimg = p;
        if (nd->inf_kept) {
            nd->inf_off = kept_total;
            kept_total += ALIGN16((size_t)N * per_image(nd));
            continue;
        }
        int m = 0;   // live blocks, kept sorted by offset (insertion sort: nets are small)
        for (int j = 0; j < n_live; j++) {
            int k = live[j];
            if (last[k] >= i) live[m++] = k;
        }
        n_live = m;
        size_t sz = ALIGN16(per_image(nd)), off = 0;
        for (int j = 0; j < n_live; j++) {
            const struct kd_node * o = &net->nodes[live[j]];
            if (o->inf_off >= off + sz) break;
            size_t end = o->inf_off + ALIGN16(per_image(o));
            if (end > off) off = end;
        }
        nd->inf_off = off;
        if (off + sz > peak) peak = off + sz;
        int j = n_live++;
        while (j > 0 && net->nodes[live[j - 1]].inf_off > off) { live[j] = live[j - 1]; j--; }
        live[j] = i;
    }
    int B = N;
    if (!(mode & (KD_MODE_BN_BATCH | KD_MODE_DROPOUT))) {
        bool has_conv = false;
        for (int i = 0; i < nn; i++) has_conv |= net->nodes[i].spec.type == KD_LAYER_CONV2D;
        int want = net->chunk > 0 ? net->chunk : auto_chunk(peak + cimg, has_conv);
        if (want < N) {
            int nch = (N + want - 1) / want;
            B = (N + nch - 1) / nch;   // balanced chunks: 1000 at most 128 -> 8 x 125
        }
    }
    free(need); free(live);
    const size_t scratch = kept_total, cache_off = scratch + (size_t)B * peak;
    size_t total = cache_off + cfix + (size_t)B * cimg;
    enum kd_status st = grow(&net->inf, &net->inf_cap, total, "the inference arena");
    if (st == KD_OK) st = ensure_work(net, B);
    if (st != KD_OK) { free(last); return st; }
    const size_t x_img = (size_t)net->C * net->H * net->W;
    for (int n0 = 0; n0 < N; n0 += B) {
        const int nb = N - n0 < B ? N - n0 : B;
        for (int i = 0; i < nn; i++) {
            struct kd_node * nd = &net->nodes[i];
            if (last[i] == i && !nd->inf_kept && !(mode & KD_MODE_BN_BATCH)) continue;   // nobody reads it
            const float * in[2] = { NULL, NULL };
            if (nd->spec.type == KD_LAYER_INPUT) in[0] = nd->ext + (size_t)n0 * per_image(nd);
            for (int k = 0; k < n_inputs(&nd->spec); k++) {
                int src = nd->spec.inp[k];
                if (src == KD_INPUT) in[k] = x + (size_t)n0 * x_img;
                else if (net->nodes[src].inf_kept) in[k] = net->inf + net->nodes[src].inf_off + (size_t)n0 * per_image(&net->nodes[src]);
                else in[k] = net->inf + scratch + net->nodes[src].inf_off * (size_t)B;
            }
            float * out = nd->inf_kept ? net->inf + nd->inf_off + (size_t)n0 * per_image(nd)
                                       : net->inf + scratch + nd->inf_off * (size_t)B;
            node_forward(net, i, nb, out, in[0], in[1], net->inf + cache_off, net->work, mode, dropout_seed);
        }
    }
    free(last);
    net->last_chunk = B;
    return KD_OK;
}

// Activation layouts of a forward that backward may follow; each returns the floats used.
// Full: every output at its planned act_off. Lean (KD_MODE_LEAN): an elementwise node (ReLU,
// add) writes its output over an input that nothing else reads, that is neither the output
// nor kept, and whose own backward does not read it (every layer but a ReLU reads inputs,
// not its output) -- so conv -> BN -> ReLU stores two tensors, and BN -> add -> ReLU one.
// The other outputs are packed in node order.
static size_t full_layout(struct kd_net * net) {
    for (int i = 0; i < net->n_nodes; i++) { net->nodes[i].cur_off = net->nodes[i].act_off; net->nodes[i].overwritten = false; }
    return net->acts_used;
}

static bool can_overwrite(const struct kd_net * net, int k) {
    if (k == KD_INPUT) return false;
    const struct kd_node * in = &net->nodes[k];
    return in->n_consumers == 1 && k != net->out_node && !in->keep && !layer_info[in->spec.type].backward_reads_output;
}

static size_t lean_layout(struct kd_net * net) {
    size_t off = net->in_off + (size_t)net->N * net->C * net->H * net->W;
    for (int i = 0; i < net->n_nodes; i++) net->nodes[i].overwritten = false;
    for (int i = 0; i < net->n_nodes; i++) {
        struct kd_node * nd = &net->nodes[i];
        const struct kd_layer_spec * s = &nd->spec;
        int k = -2;   // the input whose buffer this node takes, if any
        if (s->type == KD_LAYER_RELU && can_overwrite(net, s->inp[0])) k = s->inp[0];
        else if (s->type == KD_LAYER_ADD && can_overwrite(net, s->inp[0])) k = s->inp[0];
        else if (s->type == KD_LAYER_ADD && can_overwrite(net, s->inp[1])) k = s->inp[1];
        if (k >= 0) {
            nd->cur_off = net->nodes[k].cur_off;
            net->nodes[k].overwritten = true;
            continue;
        }
        nd->cur_off = off;
        off += nd->numel;
    }
    return off;
}

enum kd_status kd_net_forward(struct kd_net * net, const float * x, int N, int C, int H, int W,
                              unsigned mode, uint64_t dropout_seed) {
    if (!net || !x) KD_FAIL(KD_ERR_VALUE, "net and x must not be NULL");
    if (mode > (KD_MODE_TRAIN | KD_MODE_NO_GRAD | KD_MODE_LEAN)) KD_FAIL(KD_ERR_VALUE, "mode %u is not a combination of kd_mode flags", mode);
    if ((mode & KD_MODE_LEAN) && (mode & KD_MODE_NO_GRAD)) KD_FAIL(KD_ERR_VALUE, "KD_MODE_LEAN is for forwards that backward follows, not with KD_MODE_NO_GRAD");
    KD_TRY(kd_net_plan(net, N, C, H, W));
    if (mode & KD_MODE_BN_BATCH) {
        // Batch statistics of a single value are meaningless (variance 0); PyTorch refuses too.
        for (int i = 0; i < net->n_nodes; i++) {
            const struct kd_node * nd = &net->nodes[i];
            if (nd->spec.type == KD_LAYER_BATCHNORM && N * nd->h * nd->w == 1)
                KD_FAIL(KD_ERR_VALUE, "batchnorm '%s' needs more than 1 value per channel in training mode "
                        "(batch of 1 with 1x1 features); use a larger batch or eval mode", nd->name);
        }
    }
    for (int i = 0; i < net->n_nodes; i++)
        if (net->nodes[i].spec.type == KD_LAYER_INPUT && !net->nodes[i].ext)
            KD_FAIL(KD_ERR_STATE, "input '%s' has a shape but no data: give it with kd_net_set_input", net->nodes[i].name);
    net->forward_done = false;
    for (int i = 0; i < net->n_nodes; i++) net->nodes[i].grad_live = net->nodes[i].inj_live = false;
    if (mode & KD_MODE_NO_GRAD) {
        KD_TRY(forward_infer(net, x, mode, dropout_seed));
        net->infer_done = true;
    } else {
        const size_t used = (mode & KD_MODE_LEAN) ? lean_layout(net) : full_layout(net);
        KD_TRY(grow(&net->acts, &net->acts_cap, used, "activations"));
        KD_TRY(grow(&net->cache, &net->cache_cap, net->cache_used, "the backward cache"));
        KD_TRY(ensure_work(net, N));
        memcpy(net->acts + net->in_off, x, (size_t)N * C * H * W * sizeof(float));
        for (int i = 0; i < net->n_nodes; i++) {
            struct kd_node * nd = &net->nodes[i];
            const struct kd_layer_spec * s = &nd->spec;
            node_forward(net, i, N, net->acts + nd->cur_off, s->type == KD_LAYER_INPUT ? nd->ext : act_of(net, s->inp[0]),
                         n_inputs(s) == 2 ? act_of(net, s->inp[1]) : NULL,
                         net->cache + nd->cache_off, net->work, mode, dropout_seed);
        }
        net->infer_done = false;
        net->last_chunk = 0;
    }
    net->forward_done = true;
    net->forward_mode = mode;
    return KD_OK;
}

const float * kd_net_output(const struct kd_net * net, int node) {
    if (!net || !net->forward_done) return NULL;
    if (node < 0) node = net->out_node;
    if (node >= net->n_nodes) return NULL;
    const struct kd_node * nd = &net->nodes[node];
    if (net->infer_done) return nd->inf_kept ? net->inf + nd->inf_off : NULL;
    if (nd->overwritten) return NULL;
    return net->acts + nd->cur_off;
}

enum kd_status kd_net_keep(struct kd_net * net, int node, bool keep) {
    if (!net) KD_FAIL(KD_ERR_VALUE, "net is NULL");
    if (node < 0 || node >= net->n_nodes) KD_FAIL(KD_ERR_VALUE, "node %d does not exist (the net has %d)", node, net->n_nodes);
    net->nodes[node].keep = keep;
    return KD_OK;
}

bool kd_net_kept(const struct kd_net * net, int node) {
    return net && node >= 0 && node < net->n_nodes && net->nodes[node].keep;
}

enum kd_status kd_net_set_chunk(struct kd_net * net, int images) {
    if (!net) KD_FAIL(KD_ERR_VALUE, "net is NULL");
    if (images < 0) KD_FAIL(KD_ERR_VALUE, "chunk (%d images) must be >= 0 (0 = automatic)", images);
    net->chunk = images;
    return KD_OK;
}

int kd_net_last_chunk(const struct kd_net * net) { return net ? net->last_chunk : 0; }

void kd_net_memory(const struct kd_net * net, struct kd_net_memory * m) {
    memset(m, 0, sizeof *m);
    if (!net) return;
    const size_t f = sizeof(float);
    m->params = net->params ? (net->n_params + net->n_buffers) * f : 0;
    m->grads = net->grads ? net->n_params * f : 0;
    m->activations = net->acts ? net->acts_cap * f : 0;
    m->gradients = net->dacts ? net->dacts_cap * f : 0;
    for (int i = 0; i < net->n_nodes; i++) m->gradients += net->nodes[i].inj_cap * f;
    m->cache = net->cache ? net->cache_cap * f : 0;
    m->inference = net->inf ? net->inf_cap * f : 0;
    m->work = net->work ? net->work_cap * f : 0;
}

// ---------------------------------------------------------------------------------------
// Backward. A gradient slot is initialised on first touch -- from what kd_net_grad_add
// gave the node, else zero -- so only nodes that a gradient actually reaches cost a pass,
// and the sum runs in the same order as if the additions had gone to the slot directly.

static float * grad_of(struct kd_net * net, int node) {
    struct kd_node * nd = &net->nodes[node];
    float * g = net->dacts + nd->grad_off;
    if (!nd->grad_live) {
        if (nd->inj_live) memcpy(g, nd->inj, nd->numel * sizeof(float));
        else memset(g, 0, nd->numel * sizeof(float));
        nd->grad_live = true;
    }
    return g;
}

// Where a node's backward writes the gradient of input k: dinp for the net's input, the
// input node's slot if that gradient is needed, else NULL (the layer skips it).
static float * input_grad(struct kd_net * net, int k, float * dinp) {
    if (k == KD_INPUT) return dinp;
    return net->nodes[k].needs_grad ? grad_of(net, k) : NULL;
}

enum kd_status kd_net_grad_add(struct kd_net * net, int node, const float * g, float scale) {
    if (!net || !g) KD_FAIL(KD_ERR_VALUE, "net and g must not be NULL");
    if (!net->forward_done) KD_FAIL(KD_ERR_STATE, "no forward pass to add a gradient to");
    if (net->infer_done) KD_FAIL(KD_ERR_STATE, "the last forward was KD_MODE_NO_GRAD: no gradient can be added");
    if (node < 0) node = net->out_node;
    if (node >= net->n_nodes) KD_FAIL(KD_ERR_VALUE, "node %d does not exist (the net has %d)", node, net->n_nodes);
    struct kd_node * nd = &net->nodes[node];
    const size_t n = nd->numel;
    if (!nd->inj_live) {
        KD_TRY(grow(&nd->inj, &nd->inj_cap, n, "an added gradient"));
        memset(nd->inj, 0, n * sizeof(float));
        nd->inj_live = true;
    }
    float * d = nd->inj;
    #pragma omp parallel for schedule(static) if (n > 65536)
    for (size_t i = 0; i < n; i++) d[i] += scale * g[i];
    return KD_OK;
}

enum kd_status kd_net_backward(struct kd_net * net, const float * dout, float * dinp) {
    if (!net) KD_FAIL(KD_ERR_VALUE, "net is NULL");
    if (!net->forward_done) KD_FAIL(KD_ERR_STATE, "backward needs a forward pass first");
    if (net->infer_done) KD_FAIL(KD_ERR_STATE, "the last forward was KD_MODE_NO_GRAD: backward needs a forward without it");
    // Allocated on first use: nets that only ever run forward (teachers, evaluation) never
    // hold gradients of activations.
    KD_TRY(grow(&net->dacts, &net->dacts_cap, net->dacts_used, "activation gradients"));
    if (dout) KD_TRY(kd_net_grad_add(net, net->out_node, dout, 1.0f));
    KD_TRY(ensure_work(net, net->N));
    int N = net->N;
    if (dinp) memset(dinp, 0, (size_t)N * net->C * net->H * net->W * sizeof(float));
    for (int i = 0; i < net->n_nodes; i++)
        if (net->nodes[i].spec.type == KD_LAYER_INPUT && net->nodes[i].dext)
            memset(net->nodes[i].dext, 0, net->nodes[i].numel * sizeof(float));
    // The gradient of a node's output is needed only if the node or one of its ancestors has
    // parameters or is an input whose gradient was asked for (as PyTorch's requires_grad):
    // an MLP's Flatten on the input needs none, so its Linear skips the input-gradient product.
    for (int i = 0; i < net->n_nodes; i++) {
        struct kd_node * nd = &net->nodes[i];
        const struct kd_layer_spec * s = &nd->spec;
        bool need = nd->w_off != NO_OFF || nd->b_off != NO_OFF || (s->type == KD_LAYER_INPUT && nd->dext);
        for (int k = 0; k < n_inputs(s); k++) need |= s->inp[k] == KD_INPUT ? dinp != NULL : net->nodes[s->inp[k]].needs_grad;
        nd->needs_grad = need;
    }
    for (int i = net->n_nodes - 1; i >= 0; i--) {
        struct kd_node * nd = &net->nodes[i];
        if (!nd->grad_live && !nd->inj_live) continue;   // no gradient reached this node
        if (!nd->needs_grad) continue;                    // nothing upstream takes one
        const struct kd_layer_spec * s = &nd->spec;
        const float * d = grad_of(net, i);
        const float * out = net->acts + nd->cur_off;
        const float * cache = net->cache + nd->cache_off;
        const float * in = act_of(net, s->inp[0]);
        float * din = input_grad(net, s->inp[0], dinp);
        int c, h, w;
        in_shape(net, s->inp[0], &c, &h, &w);
        const float * wt = nd->w_off != NO_OFF ? net->params + nd->w_off : NULL;
        float * dw = nd->w_off != NO_OFF ? net->grads + nd->w_off : NULL;
        float * db = nd->b_off != NO_OFF ? net->grads + nd->b_off : NULL;
        switch (s->type) {
        case KD_LAYER_LINEAR:
            kd_linear_backward(din, dw, db, d, in, wt, N, c, nd->c, net->work);
            break;
        case KD_LAYER_CONV2D: {
            struct kd_conv_shape cs = conv_shape(net, nd, N);
            kd_conv2d_backward(din, dw, db, d, in, wt, &cs, net->work);
            break;
        }
        case KD_LAYER_BATCHNORM:
            kd_batchnorm_backward(din, dw, db, d, in, cache, cache + c, wt, N, c, h * w,
                                  (net->forward_mode & KD_MODE_BN_BATCH) != 0);
            break;
        case KD_LAYER_RELU:
            if (din) kd_relu_backward(din, d, out, nd->numel);
            break;
        case KD_LAYER_MAXPOOL2D:
            if (din) kd_maxpool2d_backward(din, d, (const int32_t *)cache, N, c, h, w, nd->h, nd->w);
            break;
        case KD_LAYER_AVGPOOL2D:
            if (din) kd_avgpool2d_backward(din, d, N, c, h, w, nd->h, nd->w, s->kernel, s->stride, s->padding);
            break;
        case KD_LAYER_GLOBAL_AVGPOOL:
            if (din) kd_gap_backward(din, d, N, c, h * w);
            break;
        case KD_LAYER_DROPOUT:
            if (!din) break;
            if ((net->forward_mode & KD_MODE_DROPOUT) && s->p > 0) kd_dropout_backward(din, d, cache, nd->numel);
            else kd_add_backward(din, NULL, d, nd->numel);
            break;
        case KD_LAYER_FLATTEN:
        case KD_LAYER_RESHAPE:
            if (din) kd_add_backward(din, NULL, d, nd->numel);
            break;
        case KD_LAYER_ADD: {
            float * din2 = input_grad(net, s->inp[1], dinp);
            kd_add_backward(din, din2, d, nd->numel);
            break;
        }
        case KD_LAYER_INPUT:
            if (nd->dext) kd_add_backward(nd->dext, NULL, d, nd->numel);
            break;
        case KD_LAYER_UPSAMPLE:
            if (din) kd_nearest_backward(din, d, N, c, h, w, nd->h, nd->w);
            break;
        case KD_LAYER_SIGMOID:
            if (din) kd_sigmoid_backward(din, d, out, nd->numel);
            break;
        case KD_LAYER_UPSAMPLE_BILINEAR:
            if (din) kd_bilinear_backward(din, d, N, c, h, w, nd->h, nd->w);
            break;
        case KD_LAYER_LEAKY_RELU:
            if (din) kd_leaky_relu_backward(din, d, in, nd->numel, s->slope);
            break;
        case KD_LAYER_TANH:
            if (din) kd_tanh_backward(din, d, out, nd->numel);
            break;
        case KD_LAYER_JITTER:
            if (din) kd_jitter_backward(din, d, N, c, h, w, nd->jit[0], nd->jit[1], nd->jit[2] != 0);
            break;
        case KD_LAYER_MUL:
        case KD_LAYER_CONCAT: {
            float * din2 = input_grad(net, s->inp[1], dinp);
            int c2, h2, w2;
            in_shape(net, s->inp[1], &c2, &h2, &w2);
            if (s->type == KD_LAYER_MUL) kd_mul_backward(din, din2, d, in, act_of(net, s->inp[1]), N, c, c2, h * w);
            else kd_concat_backward(din, din2, d, N, c, c2, h * w);
            break;
        }
        case KD_LAYER_COUNT:
            break;
        }
    }
    // Consumed: a second backward after the same forward starts from zero again.
    for (int i = 0; i < net->n_nodes; i++) net->nodes[i].grad_live = net->nodes[i].inj_live = false;
    return KD_OK;
}

enum kd_status kd_net_set_input(struct kd_net * net, int node, const float * x, int C, int H, int W, float * dx) {
    if (!net) KD_FAIL(KD_ERR_VALUE, "net is NULL");
    if (node < 0 || node >= net->n_nodes || net->nodes[node].spec.type != KD_LAYER_INPUT)
        KD_FAIL(KD_ERR_VALUE, "node %d is not an input node (KD_LAYER_INPUT)", node);
    if (C < 1 || H < 1 || W < 1) KD_FAIL(KD_ERR_SHAPE, "input shape (%d, %d, %d) has an empty dimension", C, H, W);
    struct kd_node * nd = &net->nodes[node];
    if (C != nd->spec.in_ch) KD_FAIL(KD_ERR_SHAPE, "input '%s' expects %d channels, got %d", nd->name, nd->spec.in_ch, C);
    if (!nd->ext_set || nd->ext_c != C || nd->ext_h != H || nd->ext_w != W) net->ext_changed = true;
    nd->ext = x;
    nd->dext = dx;
    nd->ext_c = C; nd->ext_h = H; nd->ext_w = W;
    nd->ext_set = true;
    return KD_OK;
}
