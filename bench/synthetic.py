"""The vocabulary the benchmarks' synthetic conversations are drawn from."""

WORDS = (
    "the cache model token prompt history answer question engine layer attention value key "
    "python function return list string error file server request memory thread speed number "
    "river mountain garden kitchen window morning evening winter summer bridge station market "
    "because although however therefore meanwhile instead perhaps usually quickly carefully "
    "build measure explain compare remember describe improve choose follow consider "
    "small large quiet bright heavy simple strange useful careful ancient modern gentle"
).split()
