// SPDX-License-Identifier: GPL-2.0
/* clusterip's clean-up after a backend leaves its service: a UDP socket iterator, run by user
 * space after such an update in every network namespace of the cgroup's processes, destroys
 * each socket that clusterip connected through a VIP to a backend that has left the VIP's
 * service (clusterip_gone). Its owner gets
 * ECONNABORTED and connects again, through the VIP, to a backend that is there, instead of
 * talking to a dead one for as long as the socket lives (cilium#27300). TCP is left alone:
 * a connection to a backend that stops answering ends by itself. Needs bpf_sock_destroy
 * (Linux 6.5); user space loads this object only where it loads. */
#include "common.h"
#include "clusterip.h"

int bpf_sock_destroy(struct sock_common *sk) __ksym;

/* clusterip's own reply table (the map of bpf/sock_xlate.c, reused): only sockets it
 * translated are touched, never one a process connected to the backend address itself */
CLUSTERIP_REVERSE_MAP;

/* (VIP, backend) of each backend that left a UDP service, as the reply table has them */
struct clusterip_gone_key {
	struct service_endpoint vip;
	struct service_endpoint backend;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, CLUSTERIP_GONE_MAX);
	__type(key, struct clusterip_gone_key);
	__type(value, __u8);
} clusterip_gone SEC(".maps");

__u64 destroyed = 0;

SEC("iter/udp")
int cip_udp_gone(struct bpf_iter__udp *ctx)
{
	struct sock *sk = (struct sock *)ctx->udp_sk;
	struct clusterip_reverse_key key;
	struct clusterip_gone_key gone;
	struct service_endpoint *vip;
	__u32 *daddr6;

	if (!sk)
		return 0;
	__builtin_memset(&key, 0, sizeof(key));
	if (sk->__sk_common.skc_family == AF_INET) {
		key.backend.family = AF_INET;
		key.backend.addr[0] = sk->__sk_common.skc_daddr;
	} else if (sk->__sk_common.skc_family == AF_INET6) {
		daddr6 = sk->__sk_common.skc_v6_daddr.in6_u.u6_addr32;
		if (daddr6[0] == 0 && daddr6[1] == 0 && daddr6[2] == bpf_htonl(0xffff)) {
			key.backend.family = AF_INET;
			key.backend.addr[0] = daddr6[3];
		} else {
			key.backend.family = AF_INET6;
			key.backend.addr[0] = daddr6[0];
			key.backend.addr[1] = daddr6[1];
			key.backend.addr[2] = daddr6[2];
			key.backend.addr[3] = daddr6[3];
		}
	} else {
		return 0;
	}
	key.backend.port = sk->__sk_common.skc_dport;
	key.cookie = bpf_get_socket_cookie(sk);
	vip = bpf_map_lookup_elem(&clusterip_reverse, &key);
	if (!vip)
		return 0;
	gone.vip = *vip;
	gone.backend = key.backend;
	if (!bpf_map_lookup_elem(&clusterip_gone, &gone))
		return 0;
	if (bpf_sock_destroy((struct sock_common *)sk) == 0)
		__sync_fetch_and_add(&destroyed, 1);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
