import sys, torch
a, b = torch.load(sys.argv[1]), torch.load(sys.argv[2])
assert a.keys() == b.keys(), set(a) ^ set(b)
diff = [k for k in a if not torch.equal(a[k], b[k])]
print(f"{len(a)} tensors, {len(diff)} differ", diff[:10])
