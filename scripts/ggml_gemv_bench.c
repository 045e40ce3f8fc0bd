/* GEMV timing of ggml's CPU backend (llama.cpp's kernels), for scripts/bench_vs_ggml.py.
 *
 * Usage: ggml_gemv_bench TYPE OUT IN THREADS REPEATS COLD_MIB
 *   TYPE: a ggml type name (q4_0, q4_1, q8_0, q2_K, q4_K, f32, ...).
 * One graph holds N products y_i = W_i x (N copies of a random OUT x IN weight quantized to TYPE, enough
 * copies to exceed COLD_MIB so weights stream from DRAM; "hot": the same W N times). The graph is
 * computed REPEATS times; per product time = graph time / N, as in a llama.cpp decode step, where every
 * matmul of the model is one node of one graph. Prints one JSON line.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static enum ggml_type type_by_name(const char *name) {
    for (int t = 0; t < GGML_TYPE_COUNT; t++) {
        const char *n = ggml_type_name((enum ggml_type)t);
        if (n && strcmp(n, name) == 0) return (enum ggml_type)t;
    }
    return GGML_TYPE_COUNT;
}

/* median seconds per product of a graph with n products, sharing one weight (hot) or not (cold) */
static double time_graph(ggml_backend_t be, enum ggml_type type, int out_f, int in_f, int n, int hot,
                         int repeats, size_t *w_bytes) {
    struct ggml_init_params ip = {ggml_tensor_overhead() * (2 * n + 8) + ggml_graph_overhead_custom(n + 8, false),
                                  NULL, true};
    struct ggml_context *ctx = ggml_init(ip);
    int nw = hot ? 1 : n;
    struct ggml_tensor **w = malloc(sizeof(*w) * nw);
    for (int i = 0; i < nw; i++) w[i] = ggml_new_tensor_2d(ctx, type, in_f, out_f);
    struct ggml_tensor *x = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, in_f, 1);
    struct ggml_cgraph *gf = ggml_new_graph_custom(ctx, n + 8, false);
    for (int i = 0; i < n; i++) ggml_build_forward_expand(gf, ggml_mul_mat(ctx, w[hot ? 0 : i], x));
    ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors(ctx, be);

    float *src = malloc(sizeof(float) * (size_t)in_f * out_f);
    size_t row = ggml_row_size(type, in_f);
    char *q = malloc(row * out_f);
    srand(0);
    for (size_t j = 0; j < (size_t)in_f * out_f; j++) src[j] = ((float)rand() / RAND_MAX - 0.5f) * 0.04f;
    ggml_quantize_chunk(type, src, q, 0, out_f, in_f, NULL);
    for (int i = 0; i < nw; i++) ggml_backend_tensor_set(w[i], q, 0, row * out_f);
    float *xv = malloc(sizeof(float) * in_f);
    for (int j = 0; j < in_f; j++) xv[j] = (float)rand() / RAND_MAX - 0.5f;
    ggml_backend_tensor_set(x, xv, 0, sizeof(float) * in_f);
    *w_bytes = row * out_f;

    ggml_gallocr_t ga = ggml_gallocr_new(ggml_backend_get_default_buffer_type(be));
    ggml_gallocr_alloc_graph(ga, gf);
    for (int r = 0; r < 3; r++) ggml_backend_graph_compute(be, gf);
    double *ts = malloc(sizeof(double) * repeats);
    for (int r = 0; r < repeats; r++) {
        double t0 = now_s();
        ggml_backend_graph_compute(be, gf);
        ts[r] = (now_s() - t0) / n;
    }
    qsort(ts, repeats, sizeof(double), cmp_double);
    double med = ts[repeats / 2];
    ggml_gallocr_free(ga);
    ggml_backend_buffer_free(buf);
    ggml_free(ctx);
    free(w); free(src); free(q); free(xv); free(ts);
    return med;
}

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: %s TYPE OUT IN THREADS REPEATS COLD_MIB\n", argv[0]);
        return 2;
    }
    enum ggml_type type = type_by_name(argv[1]);
    int out_f = atoi(argv[2]), in_f = atoi(argv[3]), threads = atoi(argv[4]), repeats = atoi(argv[5]);
    double cold_mib = atof(argv[6]);
    if (type == GGML_TYPE_COUNT) {
        fprintf(stderr, "unknown ggml type %s\n", argv[1]);
        return 2;
    }
    if (in_f % ggml_blck_size(type)) {
        printf("{\"type\": \"%s\", \"out\": %d, \"in\": %d, \"skipped\": \"in %% %lld != 0\"}\n", argv[1], out_f,
               in_f, (long long)ggml_blck_size(type));
        return 0;
    }
    ggml_backend_t be = ggml_backend_cpu_init();
    ggml_backend_cpu_set_n_threads(be, threads);
    size_t wb = ggml_row_size(type, in_f) * out_f;
    int n_cold = (int)(cold_mib * 1048576.0 / wb) + 1;
    double t_hot = time_graph(be, type, out_f, in_f, 64, 1, repeats, &wb);
    double t_cold = time_graph(be, type, out_f, in_f, n_cold, 0, repeats, &wb);
    printf("{\"type\": \"%s\", \"out\": %d, \"in\": %d, \"threads\": %d, \"bytes\": %zu, \"bpw\": %.4f, "
           "\"hot_us\": %.3f, \"cold_us\": %.3f, \"hot_gbs\": %.3f, \"cold_gbs\": %.3f, \"n_cold\": %d}\n",
           argv[1], out_f, in_f, threads, wb, 8.0 * wb / ((double)out_f * in_f), t_hot * 1e6, t_cold * 1e6,
           wb / t_hot / 1e9, wb / t_cold / 1e9, n_cold);
    ggml_backend_free(be);
    return 0;
}
