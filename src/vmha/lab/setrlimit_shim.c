/* LAB / TEST ONLY. LD_PRELOAD shim for the sanlock daemon inside this sandbox.
 *
 * The sandbox forbids raising RLIMIT_MEMLOCK and RLIMIT_RTPRIO, and sanlock exits at start when
 * it cannot ("cannot set the limits for memlock"). This library makes setrlimit() report success
 * for those two resources and forwards every other call to the real setrlimit(). Production runs
 * the system sanlock daemon unmodified, with its watchdog: never preload this there.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <sys/resource.h>

typedef int (*setrlimit_fn)(__rlimit_resource_t, const struct rlimit *);

int setrlimit(__rlimit_resource_t resource, const struct rlimit *rlim)
{
    static setrlimit_fn real;

    if (resource == RLIMIT_MEMLOCK || resource == RLIMIT_RTPRIO)
        return 0;
    if (!real)
        real = (setrlimit_fn)dlsym(RTLD_NEXT, "setrlimit");
    return real(resource, rlim);
}
