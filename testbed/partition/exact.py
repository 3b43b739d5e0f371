"""placeholder"""
def optimal(snapshot, dims, cost_model="decode", **kw):
    raise NotImplementedError
