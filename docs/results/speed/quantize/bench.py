"""Quantize the first N blocks of SmolLM2 with a method, profile, print stage table. argv: method nblocks [k=v ...]"""
import sys, time, resource, os, torch
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
from lowbit.api import load_model, calibration_windows
from lowbit.quantize import recipe_from_options, quantize_model
from lowbit.calib.profile import Profile
method, nb = sys.argv[1], int(sys.argv[2])
opts = {"bits": 4, "group_size": 128}
for kv in sys.argv[3:]:
    k, v = kv.split("=")
    opts[k] = type(opts.get(k, 1.0))(v) if k in opts else (float(v) if "." in v else int(v))
if method == "vptq":
    opts = {"vptq_preset": 2.3}
recipe = recipe_from_options(method, opts)
model, tok = load_model("smollm2-135m")
if nb < len(model.model.layers):
    model.model.layers = model.model.layers[:nb]
ids = calibration_windows(recipe, tok, model)
p = Profile()
t = time.perf_counter()
s = quantize_model(model, recipe, ids, progress=False, profile=p)
print(f"{method} {nb} blocks wall {time.perf_counter()-t:.1f}s load {os.getloadavg()} maxrss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1e6:.2f}GB")
print(p.markdown())
if len(sys.argv) > 3 or os.environ.get("SAVE"):
    torch.save({k: v for k, v in model.state_dict().items()}, os.environ.get("SAVE", "/tmp/speed/sd.pt"))
if os.environ.get("PROF"):
    p.meta.update({"model": "smollm2-135m", "blocks": nb, "wall_s": None, "loadavg": os.getloadavg()})
    p.write(os.environ["PROF"])
