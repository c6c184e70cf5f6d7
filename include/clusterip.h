/* Shared between bpf/sock_xlate.c and src/clusterip.rs: the service table, the backend slot
 * table, per-socket reverse entries and per-backend counters.
 * Addresses and ports are in network order; IPv4 uses addr[0]. */
#pragma once

#include "service.h"

#define CLUSTERIP_MAX_SERVICES 65536
#define CLUSTERIP_BACKEND_SLOTS 131072
#define CLUSTERIP_MAX_BACKENDS_PER_SERVICE 16384
#define CLUSTERIP_MAX_REVERSE 131072
/* backends gone in one update whose connected UDP sockets bpf/sock_destroy.c destroys */
#define CLUSTERIP_GONE_MAX 16384

/* A socket that was sent to a backend instead of a VIP; its value is the VIP, for recvmsg and
 * getpeername. IPv4 endpoints are always stored as AF_INET, also for IPv4-mapped IPv6. */
struct clusterip_reverse_key {
	__u64 cookie; /* bpf_get_socket_cookie */
	struct service_endpoint backend;
	__u32 pad; /* zeroed: no hole in a hashed key */
};

/* The reply table, defined once: bpf/sock_xlate.c fills it, bpf/sock_destroy.c reuses it. LRU:
 * entries of closed sockets age out. */
#define CLUSTERIP_REVERSE_MAP                                            \
	struct {                                                         \
		__uint(type, BPF_MAP_TYPE_LRU_HASH);                     \
		__uint(max_entries, CLUSTERIP_MAX_REVERSE);              \
		__type(key, struct clusterip_reverse_key);               \
		__type(value, struct service_endpoint);                  \
	} clusterip_reverse SEC(".maps")

/* Key 0, per CPU. */
struct clusterip_counters {
	__u64 refused; /* connect() or sendmsg() to a service without a usable backend */
};

/* Per backend slot; updated atomically (a connect is rare next to a packet). */
struct clusterip_stats {
	__u64 connects;  /* connect(): TCP and connected UDP */
	__u64 datagrams; /* unconnected UDP sendmsg() */
};
