// Direct Python bindings of the hot decode-path kernels.
//
// The same C++ functions are registered as torch ops (``torch.ops.lowbit.*``, see the other sources);
// a torch-op call from Python costs about 6 µs of argument boxing and dispatch before the kernel
// starts, which is as long as the whole GEMV of a small layer. These pybind11 entries call the
// functions directly (about 1 µs) and release the GIL while they run. ``lowbit.kernels`` uses them on
// the CPU inference path (``kernel_module()``); everything else goes through the torch ops.
#include <torch/extension.h>

namespace lowbit {
at::Tensor gemm_int(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero,
                    const c10::optional<at::Tensor>& bias, int64_t bits, int64_t group_size, int64_t in_features);
at::Tensor gemm_lut(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale_a,
                    const c10::optional<at::Tensor>& scale_b, const at::Tensor& table,
                    const c10::optional<at::Tensor>& bias, int64_t bits, int64_t group_size, int64_t in_features);
}  // namespace lowbit

namespace lowbit_q8 {
at::Tensor gemm_q8(const at::Tensor& x_in, const at::Tensor& codes, const at::Tensor& sa,
                   const c10::optional<at::Tensor>& sb, const c10::optional<at::Tensor>& zero,
                   const c10::optional<at::Tensor>& pos, const c10::optional<at::Tensor>& neg, double level_pos,
                   double level_neg, const c10::optional<at::Tensor>& bias, int64_t bits, int64_t group_size, int64_t in_features);
}  // namespace lowbit_q8

namespace lowbit_lutgemm {
at::Tensor gemm_lut_tiled(const at::Tensor& x_in, const at::Tensor& codes, const at::Tensor& sa,
                          const c10::optional<at::Tensor>& sb, const at::Tensor& table,
                          const c10::optional<at::Tensor>& bias, int64_t bits, int64_t group_size,
                          int64_t in_features, int64_t mode);
}  // namespace lowbit_lutgemm

namespace lowbit_vq {
at::Tensor vq_linear(const at::Tensor& x_in, const at::Tensor& codes, const at::Tensor& codebook,
                     const c10::optional<at::Tensor>& res_codes, const c10::optional<at::Tensor>& res_codebook,
                     const at::Tensor& main_cols, const c10::optional<at::Tensor>& out_codes,
                     const c10::optional<at::Tensor>& out_codebook, const c10::optional<at::Tensor>& outlier_cols,
                     const c10::optional<at::Tensor>& col_scale, const c10::optional<at::Tensor>& col_bias,
                     const c10::optional<at::Tensor>& bias, int64_t v, int64_t v0);
}  // namespace lowbit_vq

namespace lowbit_decode {
at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& w, double eps);
at::Tensor rope_cache(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& ssin, const at::Tensor& kc,
                      const at::Tensor& vc, int64_t pos, int64_t nq, int64_t nkv,
                      const c10::optional<at::Tensor>& qk_w, double qk_eps);
at::Tensor attn_decode(const at::Tensor& q_in, const at::Tensor& kc, const at::Tensor& vc, int64_t lo, int64_t hi,
                       double scale);
}  // namespace lowbit_decode

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using release = py::call_guard<py::gil_scoped_release>;
  m.def("gemm_int", &lowbit::gemm_int, release());
  m.def("gemm_lut", &lowbit::gemm_lut, release());
  m.def("gemm_q8", &lowbit_q8::gemm_q8, release());
  m.def("gemm_lut_tiled", &lowbit_lutgemm::gemm_lut_tiled, release());
  m.def("vq_linear", &lowbit_vq::vq_linear, release());
  m.def("rms_norm", &lowbit_decode::rms_norm, release());
  m.def("rope_cache", &lowbit_decode::rope_cache, release());
  m.def("attn_decode", &lowbit_decode::attn_decode, release());
}
