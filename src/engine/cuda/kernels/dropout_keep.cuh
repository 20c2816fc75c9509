// The LoRA dropout mask's hash (SplitMix64 finaliser of seed + (i + 1) * golden ratio; keep
// when the top 24 bits are >= thr), shared by lora.cu and lora_mma.cu; mirrored bit for bit by
// lora/dropout.rs `dropout_keep`.
__device__ __forceinline__ bool keep(unsigned long long seed, unsigned long long i,
                                     unsigned long long thr) {
    unsigned long long z = seed + (i + 1ull) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (z >> 40) >= thr;
}
