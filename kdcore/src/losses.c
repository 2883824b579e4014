// Losses over logits (N, V). Each returns the batch-mean loss and the gradient of
// weight * loss with respect to the logits, fusing the softmax into the backward
// (llm.c's crossentropy_softmax_backward): d/dz of -sum_k q_k log softmax(z)_k is p - q.
#include "kd_internal.h"

// Softmax cross-entropy with label smoothing (torch.nn.functional.cross_entropy,
// https://pytorch.org/docs/stable/generated/torch.nn.CrossEntropyLoss.html):
// target q = (1-eps)*onehot(y) + eps/V; loss_i = -sum_k q_k log p_k; mean over the batch.
// Computed per row with the max subtracted (stable for |z| up to float max) and
// accumulated in double.
enum kd_status kd_cross_entropy(float * loss, float * dlogits, const float * logits,
                                const int64_t * labels, int N, int V,
                                float label_smoothing, float weight, bool accumulate) {
    if (!logits || !labels || N < 1 || V < 1) KD_FAIL(KD_ERR_VALUE, "logits and labels must be non-empty");
    if (!(label_smoothing >= 0 && label_smoothing <= 1))
        KD_FAIL(KD_ERR_VALUE, "label_smoothing (%g) must be in [0, 1]", label_smoothing);
    for (int i = 0; i < N; i++)
        if (labels[i] < 0 || labels[i] >= V)
            KD_FAIL(KD_ERR_VALUE, "label %lld at position %d is outside [0, %d)", (long long)labels[i], i, V);
    const double eps = label_smoothing, off = eps / V, on = 1.0 - eps + off;
    double total = 0;
    for (int i = 0; i < N; i++) {
        const float * z = logits + (size_t)i * V;
        float zmax = z[0];
        for (int k = 1; k < V; k++) zmax = z[k] > zmax ? z[k] : zmax;
        double sum = 0, zsum = 0;
        for (int k = 0; k < V; k++) { sum += exp((double)z[k] - zmax); zsum += (double)z[k] - zmax; }
        double lse = log(sum);                          // log sum exp(z - zmax)
        int y = (int)labels[i];
        // -sum_k q_k (z_k - zmax - lse) = lse - off*sum_k(z_k - zmax) - (on-off)*(z_y - zmax)
        total += lse - off * zsum - (on - off) * ((double)z[y] - zmax);
        if (dlogits) {
            float * d = dlogits + (size_t)i * V;
            double scale = (double)weight / N;
            for (int k = 0; k < V; k++) {
                double p = exp((double)z[k] - zmax - lse);
                double g = scale * (p - (k == y ? on : off));
                d[k] = accumulate ? d[k] + (float)g : (float)g;
            }
        }
    }
    if (loss) *loss = (float)(total / N);
    if (!isfinite(total)) KD_FAIL(KD_ERR_NONFINITE, "cross-entropy is %s (non-finite logits?)", isnan(total) ? "nan" : "inf");
    return KD_OK;
}
