import ctypes

memcpyHostToDevice = 1
memcpyDeviceToHost = 2


def getDeviceCount():
    return 2


def memcpyAsync(dst, src, n, kind, stream):
    ctypes.memmove(dst, src, n)
