# ebpf-net: `make` builds every bpf/*.c into build/bpf/*.o for loading by hand with tc;
# `make demo` and `make test` install what is missing, build, and run.

CLANG ?= clang
ARCH := $(shell uname -m | sed -e 's/x86_64/x86/' -e 's/aarch64/arm64/')
BPF_CFLAGS := -O2 -g -Wall -Werror -target bpf -D__TARGET_ARCH_$(ARCH) -Iinclude
BPF_SRCS := $(wildcard bpf/*.c)
BPF_OBJS := $(patsubst bpf/%.c,build/bpf/%.o,$(BPF_SRCS))
HEADERS := $(wildcard include/*.h)
CARGO ?= cargo

.PHONY: all setup demo test bench fuzz clean

all: $(BPF_OBJS)

build/bpf/%.o: bpf/%.c $(HEADERS) | build/bpf
	$(CLANG) $(BPF_CFLAGS) -c $< -o $@

build/bpf:
	mkdir -p $@

setup:
	scripts/setup

demo: setup
	$(CARGO) build --release
	scripts/demo target/release

# The SYN-flood tests measure what a flood does: they run alone, after the rest.
test: setup all
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) test --release -- --test-threads=4 --skip syn_flood
	$(CARGO) test --release --test lb_e2e --test xdp_lb_e2e -- --test-threads=1 syn_flood

bench: setup
	$(CARGO) bench --bench suite

# The fuzz test of every packet program, long: FUZZ_PACKETS per program (seed: FUZZ_SEED).
FUZZ_PACKETS ?= 5000000
fuzz: setup
	EBPF_NET_FUZZ_PACKETS=$(FUZZ_PACKETS) $(if $(FUZZ_SEED),EBPF_NET_FUZZ_SEED=$(FUZZ_SEED)) \
		$(CARGO) test --release --test fuzz -- --nocapture

clean:
	rm -rf build
	$(CARGO) clean
